"""N replicas of the app behind nginx on loopback, each annotator kept on one replica.

    python scripts/replicas.py [--replicas 2] [--port 8000] [--studies FOLDER_OR_URL | --orthanc]
                               [--balance affinity|round-robin] [--threads T] [--work-dir DIR]
                               [-- extra monailabel start_server options, e.g. --conf models fastsam3d]

Starts the replicas (`monailabel start_server` on free loopback ports, each with its own session and
cache folders), then Debian's nginx with deploy/nginx-replicas.conf on 127.0.0.1:PORT, and waits until
/info/ answers through it; Ctrl-C stops everything. With --orthanc, Orthanc (scripts/dicomweb_store.py)
with the synthetic CT series is started first and every replica serves it: a label saved through any
replica lands there as DICOM SEG.

nginx hashes each request's annotator (the Authorization header when MONAI Label's auth is on, else
the client's address) onto one replica (consistent hashing); a replica that is down has its
annotators' requests sent to the next one, where a click starts a new interaction
(`interaction_continued: false` in its result). Replica processes are independent: interaction
state, embeddings and sessions live in the replica that made them. --balance round-robin drops the
hash (each request to the next replica), for comparison only: bench/load_test.py measures both.
Each replica runs torch on --threads threads (default: the machine's cores shared out among them).
"""

import argparse
import getpass
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import requests

REPO = Path(__file__).resolve().parents[1]
NGINX = "/usr/sbin/nginx"
CONFIG_TEMPLATE = REPO / "deploy" / "nginx-replicas.conf"
AFFINITY = "hash $annotator consistent;"  # the template's balancing line, the only one --balance changes
BALANCES = ("affinity", "round-robin")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dicomweb_store  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_missing() -> str:
    """Why nginx cannot run here ('' when it can)."""
    return "" if os.access(NGINX, os.X_OK) else f"{NGINX} not found (Debian package nginx)"


def nginx_config(listen_port: int, replica_urls: Sequence[str], work: Path, balance: str = "affinity") -> str:
    servers = "\n".join(f"        server {url.split('://', 1)[1]} max_fails=1 fail_timeout=10s;" for url in replica_urls)
    config = (CONFIG_TEMPLATE.read_text().replace("@WORK@", str(work)).replace("@SERVERS@", servers)
              .replace("@LISTEN@", f"127.0.0.1:{listen_port}").replace("@USER@", getpass.getuser()))
    if balance not in BALANCES or AFFINITY not in config:
        raise ValueError(f"balance {balance!r}: one of {', '.join(BALANCES)}, with {AFFINITY!r} in {CONFIG_TEMPLATE}")
    return config if balance == "affinity" else config.replace(AFFINITY, "# round-robin: nginx's default")


def start_nginx(listen_port: int, replica_urls: Sequence[str], work: Path, timeout_s: float = 30,
                balance: str = "affinity") -> subprocess.Popen:
    """nginx in front of the replicas, answering on 127.0.0.1:listen_port once it accepts connections."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "nginx.conf"
    config.write_text(nginx_config(listen_port, replica_urls, work, balance))
    with open(work / "nginx.out", "wb") as out:
        proc = subprocess.Popen([NGINX, "-c", str(config), "-p", str(work)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}: {dicomweb_store.read_log(work / 'nginx.out')}"
                               f"{dicomweb_store.read_log(work / 'error.log')}")
        try:
            requests.get(f"http://127.0.0.1:{listen_port}/", timeout=2)
            return proc
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                dicomweb_store.stop_process_group(proc)
                raise RuntimeError(f"nginx did not accept connections within {timeout_s} s") from None
            time.sleep(0.1)


def default_threads(replicas: int) -> int:
    """Torch threads per replica: the cores shared out, so that busy replicas do not oversubscribe them."""
    return max(1, (os.cpu_count() or 1) // replicas)


def start_replica(app: Path, studies: str, port: int, work: Path, extra: Sequence[str], threads: int) -> subprocess.Popen:
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "MONAI_LABEL_SESSION_PATH": str(work / "sessions"), "MONAI_LABEL_DATASTORE_CACHE_PATH": str(work / "cache"),
           "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "dicomweb-cache"), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads
    args = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", studies,
            "--host", "127.0.0.1", "--port", str(port), *extra]
    with open(work / "server.log", "wb") as log:
        return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def wait_for_info(url: str, procs: List[subprocess.Popen], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a replica exited while starting (see its server.log)")
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/info/ did not answer within {timeout_s} s")
        time.sleep(0.5)


@dataclass
class Cluster:
    url: str  # nginx's
    replica_urls: List[str]
    processes: List[subprocess.Popen]  # the replicas', then nginx's

    def stop(self) -> None:
        for proc in reversed(self.processes):
            dicomweb_store.stop_process_group(proc)


def start_cluster(app: Path, studies: str, replicas: int, port: int, work: Path, extra: Sequence[str] = (),
                  balance: str = "affinity", threads: Optional[int] = None) -> Cluster:
    """The replicas, each in work/replica-N, then nginx (work/nginx) on 127.0.0.1:port once all answer /info/."""
    threads = threads or default_threads(replicas)
    cluster = Cluster(f"http://127.0.0.1:{port}", [], [])
    try:
        for n in range(replicas):
            replica_port = free_port()
            cluster.processes.append(start_replica(app, studies, replica_port, work / f"replica-{n}", extra, threads))
            cluster.replica_urls.append(f"http://127.0.0.1:{replica_port}")
        for url in cluster.replica_urls:
            wait_for_info(url, cluster.processes)
        cluster.processes.append(start_nginx(port, cluster.replica_urls, work / "nginx", balance=balance))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--app", type=Path, default=REPO / "apps" / "fastsam3d")
    parser.add_argument("--studies", default=str(REPO / "sample-studies"))
    parser.add_argument("--orthanc", action="store_true", help="serve Orthanc with the synthetic CT series")
    parser.add_argument("--balance", choices=BALANCES, default="affinity")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per replica (default: cores / replicas)")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then options for every replica")
    args = parser.parse_args(argv)
    missing = nginx_missing() or (dicomweb_store.orthanc_missing() if args.orthanc else "")
    if missing:
        print(f"replicas: {missing}", file=sys.stderr)
        return 2
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="samlabel-replicas-"))
    extra = [a for a in args.extra if a != "--"]
    cluster, store = None, None
    try:
        studies = args.studies
        if args.orthanc:
            import sample_studies

            store = dicomweb_store.OrthancStore(work / "orthanc", free_port()).start()
            sample_studies.write_ct_dicom(work / "orthanc" / "series")
            store.upload(work / "orthanc" / "series")
            studies = store.url
        cluster = start_cluster(args.app, studies, args.replicas, args.port, work, extra, args.balance, args.threads)
        print(f"replicas: {', '.join(cluster.replica_urls)} behind {cluster.url} ({args.balance}; work folder {work});"
              " Ctrl-C stops them", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if cluster is not None:
            cluster.stop()
        if store is not None:
            store.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
