"""N replicas of the app behind nginx on loopback, each annotator kept on one replica.

    python scripts/replicas.py [--replicas 2] [--port 8000] [--studies FOLDER_OR_URL | --orthanc]
                               [--work-dir DIR] [-- extra monailabel start_server options, e.g. --conf models fastsam3d]

Starts the replicas (`monailabel start_server` on free loopback ports, each with its own session and
cache folders), then Debian's nginx with deploy/nginx-replicas.conf on 127.0.0.1:PORT, and waits until
/info/ answers through it; Ctrl-C stops everything. With --orthanc, Orthanc (scripts/dicomweb_store.py)
with the synthetic CT series is started first and every replica serves it: a label saved through any
replica lands there as DICOM SEG.

nginx hashes each request's annotator (the Authorization header when MONAI Label's auth is on, else
the client's address) onto one replica (consistent hashing); a replica that is down has its
annotators' requests sent to the next one, where a click starts a new interaction
(`interaction_continued: false` in its result). Replica processes are independent: interaction
state, embeddings and sessions live in the replica that made them.
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
from pathlib import Path
from typing import List, Sequence

import requests

REPO = Path(__file__).resolve().parents[1]
NGINX = "/usr/sbin/nginx"
CONFIG_TEMPLATE = REPO / "deploy" / "nginx-replicas.conf"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dicomweb_store  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_missing() -> str:
    """Why nginx cannot run here ('' when it can)."""
    return "" if os.access(NGINX, os.X_OK) else f"{NGINX} not found (Debian package nginx)"


def nginx_config(listen_port: int, replica_urls: Sequence[str], work: Path) -> str:
    servers = "\n".join(f"        server {url.split('://', 1)[1]} max_fails=1 fail_timeout=10s;" for url in replica_urls)
    return (CONFIG_TEMPLATE.read_text().replace("@WORK@", str(work)).replace("@SERVERS@", servers)
            .replace("@LISTEN@", f"127.0.0.1:{listen_port}").replace("@USER@", getpass.getuser()))


def start_nginx(listen_port: int, replica_urls: Sequence[str], work: Path, timeout_s: float = 30) -> subprocess.Popen:
    """nginx in front of the replicas, answering on 127.0.0.1:listen_port once it accepts connections."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "nginx.conf"
    config.write_text(nginx_config(listen_port, replica_urls, work))
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


def start_replica(app: Path, studies: str, port: int, work: Path, extra: Sequence[str]) -> subprocess.Popen:
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "MONAI_LABEL_SESSION_PATH": str(work / "sessions"), "MONAI_LABEL_DATASTORE_CACHE_PATH": str(work / "cache"),
           "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "dicomweb-cache"), "PYTHONUNBUFFERED": "1"}
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--app", type=Path, default=REPO / "apps" / "fastsam3d")
    parser.add_argument("--studies", default=str(REPO / "sample-studies"))
    parser.add_argument("--orthanc", action="store_true", help="serve Orthanc with the synthetic CT series")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then options for every replica")
    args = parser.parse_args(argv)
    missing = nginx_missing() or (dicomweb_store.orthanc_missing() if args.orthanc else "")
    if missing:
        print(f"replicas: {missing}", file=sys.stderr)
        return 2
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="samlabel-replicas-"))
    extra = [a for a in args.extra if a != "--"]
    procs, store = [], None
    try:
        studies = args.studies
        if args.orthanc:
            import sample_studies

            store = dicomweb_store.OrthancStore(work / "orthanc", free_port()).start()
            sample_studies.write_ct_dicom(work / "orthanc" / "series")
            store.upload(work / "orthanc" / "series")
            studies = store.url
        urls = []
        for n in range(args.replicas):
            port = free_port()
            procs.append(start_replica(args.app, studies, port, work / f"replica-{n}", extra))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_for_info(url, procs)
        procs.append(start_nginx(args.port, urls, work / "nginx"))
        print(f"replicas: {', '.join(urls)} behind http://127.0.0.1:{args.port} (work folder {work}); Ctrl-C stops them",
              flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in reversed(procs):
            dicomweb_store.stop_process_group(proc)
        if store is not None:
            store.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
