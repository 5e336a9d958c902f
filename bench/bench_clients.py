"""Server memory under many distinct client ids: each Slicer-shaped client clicks once, so every
click is a new interaction; the per-client state is bounded (LRU), so the memory levels off.

    .venv/bin/python bench/bench_clients.py [--clients 1000]

Runs the app with its test-double model (tests/marker_app: the real engine, window, resampling
and writers around a network that costs nothing), on the sample CT, and reads the server's
resident memory (VmRSS) after every 100 clients.
"""

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench_clicks import click, start_server

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests" / "marker_app"))
import click_marker  # noqa: E402
import sample_studies  # noqa: E402


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        studies = work / "studies"
        studies.mkdir()
        sample_studies.write_ct(studies / sample_studies.CT_NAME)
        click_marker.write_checkpoint(work / "click_marker.pth")
        conf = {"models": "click_marker", "click_marker_checkpoint": work / "click_marker.pth"}
        proc, url = start_server(studies, conf, work, app=REPO / "tests" / "marker_app")
        image = sample_studies.CT_NAME.split(".")[0]
        try:
            print("| clients | server RSS (MB) | seconds |\n|---|---|---|")
            start = time.perf_counter()
            click(url, "click_marker", image, [[85, 71, 28]], [], "warm-up")
            print(f"| 0 | {resident_mb(proc.pid):.0f} | 0 |", flush=True)
            for n in range(1, args.clients + 1):
                click(url, "click_marker", image, [[85 + n % 7, 71, 28]], [], f"client-{n}")
                if n % args.every == 0:
                    print(f"| {n} | {resident_mb(proc.pid):.0f} | {time.perf_counter() - start:.0f} |", flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
