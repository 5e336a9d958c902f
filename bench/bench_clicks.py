"""End-to-end click latency through a real `monailabel start_server`, as the Slicer plugin asks.

    .venv/bin/python bench/bench_clicks.py [--repeats 5] [--models fastsam3d,sam_med3d]

Makes a 512 x 512 x 300 int16 CT-like volume (0.7 x 0.7 x 1.0 mm, LPS) and seeded full-size
checkpoints in the official format, starts the server on loopback, and times HTTP round trips:
  first click   a new window (image already cached): window sampling + encoder + decoder + write
  next click    another click in the same window: decoder + write only
and, for reference, how long reading the volume from disk takes (what a server that reloads the
image on every click pays before any model runs). Medians over --repeats.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
import torch

from samlabel.checkpoint import expected_shapes
from samlabel.registry import get_spec
from samlabel.seeded import seeded_state_dict, training_checkpoint

APP = Path(__file__).resolve().parents[1] / "apps" / "fastsam3d"
SHAPE = (512, 512, 300)


def make_ct(path: Path) -> None:
    i, j, k = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    body = ((i - 256) / 220.0) ** 2 + ((j - 256) / 170.0) ** 2 <= 1
    organ = ((i - 200) / 60.0) ** 2 + ((j - 230) / 45.0) ** 2 + ((k - 150) / 70.0) ** 2 <= 1
    volume = np.where(body, 40, -1000) + np.where(organ, 60, 0)
    volume = (volume + (np.random.default_rng(0).standard_normal(SHAPE) * 10)).astype(np.int16)
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), str(path))


def start_server(studies: Path, conf: dict, work: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies),
            "--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        args += ["--conf", key, str(value)]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "MONAI_LABEL_SESSION_PATH": str(work / "sessions"), "MONAI_LABEL_DATASTORE_CACHE_PATH": str(work / "cache")}
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=work)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(f"{url}/info/", timeout=2).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.5)
    raise RuntimeError((work / "server.log").read_text())


def click(url, model, points, client):
    params = {"label": "organ", "foreground": points, "background": [], "client_id": client,
              "result_extension": ".nrrd", "result_dtype": "uint8"}
    start = time.perf_counter()
    response = requests.post(f"{url}/infer/{model}", params={"image": "ct"}, files={"params": (None, json.dumps(params))},
                             timeout=600)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="fastsam3d,sam_med3d")
    args = parser.parse_args()
    models = args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        studies = work / "studies"
        studies.mkdir()
        make_ct(studies / "ct.nii.gz")
        start = time.perf_counter()
        nib.load(str(studies / "ct.nii.gz")).get_fdata(dtype=np.float32)
        reload_s = time.perf_counter() - start
        conf = {"models": ",".join(models)}
        for name in models:
            spec = get_spec(name)
            path = work / spec.checkpoint_file
            torch.save(training_checkpoint(seeded_state_dict(expected_shapes(spec), 0)), path)
            conf[f"{name}_checkpoint"] = path
        proc, url = start_server(studies, conf, work)
        try:
            print(f"{SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} int16 CT, {os.cpu_count()} CPU threads, medians of {args.repeats}")
            print(f"reading the volume from disk: {reload_s:.2f} s")
            print("| model | cold first click (s) | first click, new window (s) | next click, same window (s) |")
            print("|---|---|---|---|")
            for name in models:
                cold = click(url, name, [[200, 230, 150]], f"{name}-warmup")  # loads model and image
                firsts, nexts = [], []
                for r in range(args.repeats):
                    centre = [200 + 20 * r, 230, 150]
                    firsts.append(click(url, name, [centre], f"{name}-{r}"))
                    nexts.append(click(url, name, [centre, [centre[0] + 5, 232, 152]], f"{name}-{r}"))
                print(f"| {name} | {cold:.2f} | {statistics.median(firsts):.2f} | {statistics.median(nexts):.2f} |")
                sys.stdout.flush()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
