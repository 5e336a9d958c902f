"""End-to-end click latency through a real `monailabel start_server`, as the Slicer plugin asks.

    .venv/bin/python bench/bench_clicks.py [--repeats 5] [--models fastsam3d,sam_med3d]

Makes a 512 x 512 x 300 int16 CT-like volume (0.7 x 0.7 x 1.0 mm, LPS; one copy per model, so
each model's first click meets a new image) and seeded full-size checkpoints in the official
format, starts the server on loopback and clicks like a user, timing HTTP round trips:
  first click     on the new CT: image load + window sampling + encoder + decoder + write
  after opening   the first click on another copy that the client opened first (Slicer's GET
                  /datastore/image), once the server has read it in the background (samlabel.prefetch)
  next 5 clicks   in the same window: decoder + mapping back + write (median)
  far click       a click 150 mm away: a new window, so the encoder runs again
Next to it, in the same run, MONAI Label's uncached request path: MONAI LoadImage of the CT,
the model (encoder + decoder) and MONAI Label's writer, every request (median of --repeats).
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
from samlabel.seeded import save_in_official_layout, seeded_state_dict

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


def start_server(studies: Path, conf: dict, work: Path, app: Path = APP):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
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
            if proc.poll() is not None:  # it stopped (e.g. a --conf it refuses)
                break
            time.sleep(0.5)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError((work / "server.log").read_text())


def wait_for_line(log: Path, text: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in {log} after {timeout_s} s")
        time.sleep(0.1)


def click(url, model, image, foreground, background, client, **extra):
    params = {"label": "organ", "foreground": foreground, "background": background, "client_id": client,
              "result_extension": ".nrrd", "result_dtype": "uint8", **extra}
    start = time.perf_counter()
    response = requests.post(f"{url}/infer/{model}", params={"image": image}, files={"params": (None, json.dumps(params))},
                             timeout=600)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed


def uncached_request(path: Path, model_name: str, checkpoint: Path, repeats: int) -> float:
    """What a request costs without caches: load the image, run encoder and decoder, write."""
    from monai.transforms import LoadImage
    from monailabel.transform.writer import write_itk

    from samlabel.checkpoint import load_model
    from samlabel.predictor import SamPredictor3D

    predictor = SamPredictor3D(load_model(get_spec(model_name), checkpoint))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        image = LoadImage(image_only=True)(str(path))
        window = image[200 - 64:200 + 64, 230 - 64:230 + 64, 150 - 64:150 + 64].float()
        predictor.set_volume((window - window.mean()) / window.std())
        logits, _ = predictor.predict_torch(torch.tensor([[64.0, 64, 64]]), torch.tensor([1]))
        mask = np.zeros(image.shape, np.uint8)
        mask[200 - 64:200 + 64, 230 - 64:230 + 64, 150 - 64:150 + 64] = torch.nn.functional.interpolate(
            logits, size=(128,) * 3, mode="trilinear").numpy()[0, 0] > 0
        with tempfile.NamedTemporaryFile(suffix=".nrrd") as out:
            write_itk(mask, out.name, image.affine.numpy(), "uint8", False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(work: Path, models, repeats: int, app: Path = APP) -> dict:
    """Per model: first, after_opening, next (median of 5), far (s, HTTP) and uncached (s, median of repeats)."""
    studies = work / "studies"
    studies.mkdir()
    for name in models:
        make_ct(studies / f"ct_{name}.nii.gz")
        make_ct(studies / f"ct_{name}_opened.nii.gz")
    conf = {"models": ",".join(models)}
    for name in models:
        spec = get_spec(name)
        path = work / spec.checkpoint_file
        save_in_official_layout(spec, seeded_state_dict(expected_shapes(spec), 0), path)
        conf[f"{name}_checkpoint"] = path
    proc, url = start_server(studies, conf, work, app)
    rows = {}
    try:
        for name in models:
            image, centre = f"ct_{name}", [200, 230, 150]
            first = click(url, name, image, [centre], [], "user")
            nexts, foreground, background = [], [centre], []
            for step in range(5):  # alternate positive and negative refinements near the first click
                point = [centre[0] + 3 * (step + 1), centre[1] - 2 * step, centre[2] + step]
                (foreground if step % 2 == 0 else background).append(point)
                nexts.append(click(url, name, image, foreground, background, "user"))
            far = click(url, name, image, [[centre[0] + 200, centre[1], centre[2]]], [], "user")
            opened = f"{image}_opened"
            assert requests.get(f"{url}/datastore/image", params={"image": opened}, timeout=600).status_code == 200
            wait_for_line(work / "server.log", f"prefetched {opened}")
            after_opening = click(url, name, opened, [centre], [], "user")
            rows[name] = {"first": first, "after_opening": after_opening, "next": statistics.median(nexts), "far": far}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    for name in models:
        rows[name]["uncached"] = uncached_request(studies / f"ct_{name}.nii.gz", name, conf[f"{name}_checkpoint"], repeats)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="fastsam3d,sam_med3d")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count()))
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(tmp), args.models.split(","), args.repeats)
    print(f"{SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} int16 CT, torch threads {torch.get_num_threads()}, HTTP round trips")
    print("| model | first click (s) | first click after opening (s) | next 5 clicks, median (s) | far click (s) "
          "| uncached request, median (s) | next / uncached |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['first']:.2f} | {row['after_opening']:.2f} | {row['next']:.3f} | {row['far']:.2f} "
              f"| {row['uncached']:.2f} | 1/{row['uncached'] / row['next']:.0f} |")


if __name__ == "__main__":
    main()
