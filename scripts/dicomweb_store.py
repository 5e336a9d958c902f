"""A DICOMweb store on loopback: Orthanc (Debian's orthanc + orthanc-dicomweb) holding the
synthetic CT series, for serving the app on a real DICOM path.

    python scripts/dicomweb_store.py [--port 8042] [--work-dir DIR] [-- COMMAND ...]

Starts Orthanc, uploads the DICOM series of ``sample_studies.write_ct_dicom`` and prints the
DICOMweb URL (http://127.0.0.1:PORT/dicom-web). With a COMMAND (e.g. ``monailabel
start_server ... --studies http://127.0.0.1:8042/dicom-web``), runs it and stops Orthanc when
it ends; without one, keeps Orthanc up until Ctrl-C.

Orthanc 1.10 listens on every interface and has no option to bind to loopback. Where network
namespaces can be made (root, as on CI), it runs in a private one that has only its own
loopback, and a forwarder here relays 127.0.0.1:PORT to it, so nothing else is reachable
from outside. Elsewhere it runs as it is, refusing non-loopback clients (RemoteAccessAllowed
false) with its DICOM port off.
"""

import argparse
import ctypes
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*", "/usr/lib/orthanc/libOrthancDicomWeb.so*")
NAMESPACE_PORT = 8042  # Orthanc's port inside its own network namespace
CLONE_NEWNET = 0x40000000


def orthanc_missing() -> str:
    """Why Orthanc with DICOMweb cannot run here ('' when it can)."""
    if not os.access(ORTHANC, os.X_OK):
        return f"{ORTHANC} not found (Debian packages orthanc and orthanc-dicomweb)"
    if not dicomweb_plugin():
        return "the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
    return ""


def dicomweb_plugin() -> str:
    for pattern in DICOMWEB_PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return ""


def namespaces_work() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


class OrthancStore:
    """Orthanc on 127.0.0.1:port with the DICOMweb plugin; `url` is its DICOMweb root."""

    def __init__(self, work_dir, port: int = 8042):
        self.work_dir, self.port = Path(work_dir), port
        self.url = f"http://127.0.0.1:{port}/dicom-web"
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = self.work_dir / "orthanc.log"
        self.proc = None
        self.isolated = False
        self._listener = None

    def start(self, timeout_s: float = 30) -> "OrthancStore":
        missing = orthanc_missing()
        if missing:
            raise RuntimeError(missing)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.isolated = namespaces_work()
        # Bound first, so a busy port fails here rather than as a confusing Orthanc error.
        listener = socket.create_server(("127.0.0.1", self.port)) if self.isolated else None
        config = {
            "Name": "samlabel", "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "storage"), "Plugins": [dicomweb_plugin()],
            "HttpServerEnabled": True, "HttpPort": NAMESPACE_PORT if self.isolated else self.port,
            "DicomServerEnabled": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "RegisteredUsers": {}, "StableAge": 2,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"},
        }  # fmt: skip
        config_path = self.work_dir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        command = [ORTHANC, str(config_path)]
        if self.isolated:  # a namespace with only its own loopback, brought up before Orthanc starts
            command = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "orthanc", *command]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        if self.isolated:
            self._listener = listener
            namespace = self._own_namespace(timeout_s)
            threading.Thread(target=_forward, args=(listener, namespace, NAMESPACE_PORT), daemon=True).start()
        self._wait_ready(timeout_s)
        return self

    def _own_namespace(self, timeout_s: float) -> str:
        """Orthanc's namespace, once `unshare` has made it (until then the process is in ours)."""
        namespace, ours = f"/proc/{self.proc.pid}/ns/net", os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            if os.readlink(namespace) != ours:
                return namespace
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"Orthanc did not start in its own network namespace:\n{self.log()}")

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.base}/system", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not answer within {timeout_s} s:\n{self.log()}")
            time.sleep(0.2)
        plugins = requests.get(f"{self.base}/plugins", timeout=5).json()
        if "dicom-web" not in plugins:
            self.stop()
            raise RuntimeError(f"Orthanc started without its DICOMweb plugin (plugins: {plugins})")

    def upload(self, folder) -> int:
        """POST every .dcm file of folder; returns how many Orthanc took."""
        files = sorted(Path(folder).glob("*.dcm"))
        with requests.Session() as session:
            for path in files:
                response = session.post(f"{self.base}/instances", data=path.read_bytes(),
                                        headers={"Content-Type": "application/dicom"}, timeout=30)
                response.raise_for_status()
        return len(files)

    def series(self) -> list:
        """QIDO-RS: every series in the store (DICOM JSON)."""
        response = requests.get(f"{self.url}/series", headers={"Accept": "application/dicom+json"}, timeout=10)
        response.raise_for_status()
        return response.json()

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)  # waits: a restart before it exits finds its database locked
        if self._listener is not None:
            self._listener.close()
            self._listener = None


def read_log(path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    """End a process started with start_new_session and everything it started: SIGTERM to its
    group, SIGKILL if it has not exited after timeout_s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)


def _forward(listener: socket.socket, namespace: str, port: int) -> None:
    """Relay connections accepted on `listener` (host loopback) to 127.0.0.1:port inside the
    network namespace `namespace`. This thread enters the namespace, so the sockets it connects
    live there; the listener, made before, stays in the host's."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(namespace, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {namespace}")
    finally:
        os.close(fd)
    while True:
        try:
            client, _ = listener.accept()
        except OSError:  # the listener was closed: the store stopped
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for source, target in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pump, args=(source, target), daemon=True).start()


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while True:
            data = source.recv(1 << 16)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((target, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8042)
    parser.add_argument("--work-dir", default=None, help="Orthanc's storage (default: a temporary folder)")
    args = parser.parse_args(own)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sample_studies import write_ct_dicom

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # Orthanc runs in its own session: stop it too
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="samlabel-orthanc-"))
    store = OrthancStore(work_dir, args.port).start()
    try:
        study, series = write_ct_dicom(work_dir / "series")
        count = store.upload(work_dir / "series")
        where = "in a private network namespace, relayed from loopback" if store.isolated else "refusing non-loopback clients"
        print(f"Orthanc ({where}): {count} CT instances, study {study}, series {series}", flush=True)
        print(f"DICOMweb: {store.url}", flush=True)
        if command:
            return subprocess.call(command)
        threading.Event().wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        store.stop()


if __name__ == "__main__":
    sys.exit(main())
