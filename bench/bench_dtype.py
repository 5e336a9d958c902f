"""Reduced precision against float32, per model, on the sample studies with seeded full-size
weights: the agreement of the masks (Dice) and the low-res logits (largest difference), and the
encoder and next-click times. The result decides which dtypes the app offers (--conf dtype).

    .venv/bin/python bench/bench_dtype.py [--threads 2] [--repeats 3] [--dtypes bfloat16]

Clicks: the bright ellipsoid of the synthetic CT (171 x 143 x 57, oblique) and the centre of
the MNI152 T1. Each model's first click (encode + decode) and then the same request again
(decoder only, the embedding cached) are compared with float32 on the same engine request.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from samlabel.checkpoint import expected_shapes
from samlabel.registry import get_spec
from samlabel.request import ClickRequest
from samlabel.seeded import save_in_official_layout, seeded_state_dict
from samlabel.settings import DTYPES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import sample_studies  # noqa: E402


def click_on(image_name: str):
    """A voxel on a structure of each sample study, in the stored array's indices."""
    if image_name == sample_studies.CT_NAME:
        return ClickRequest(foreground=((95, 70, 28),), client="bench")
    return ClickRequest(foreground=((91, 109, 91),), client="bench")


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="fastsam3d,sam_med3d,medsam,sam_med2d")
    parser.add_argument("--dtypes", default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats}")
    print("| model | image | dtype | mask Dice vs float32 | max abs logit diff | encoder float32 (s) | encoder dtype (s) "
          "| speed-up | next click float32 (s) | next click dtype (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        images = [folder / sample_studies.CT_NAME, folder / sample_studies.MRI_NAME]
        sample_studies.write_ct(images[0])
        sample_studies.write_mri(images[1])
        for name in args.models.split(","):
            spec = get_spec(name)
            checkpoint = folder / spec.checkpoint_file
            save_in_official_layout(spec, seeded_state_dict(expected_shapes(spec), 0), checkpoint)
            engines = {dtype: spec.engine(spec, checkpoint, dtype=DTYPES[dtype]) for dtype in ["float32", *args.dtypes.split(",")]}
            for image in images:
                request = click_on(image.name)
                results = {}
                for dtype, engine in engines.items():
                    encodes = []
                    for _ in range(args.repeats):
                        engine.embeddings = type(engine.embeddings)(engine.embeddings.capacity)  # a cold first click
                        data, seconds = timed(lambda: engine.post(engine.predict(str(image), request)))
                        encodes.append(seconds)
                    nexts = [timed(lambda: engine.post(engine.predict(str(image), request)))[1] for _ in range(args.repeats)]
                    results[dtype] = (data, statistics.median(encodes), statistics.median(nexts))
                reference, encode32, next32 = results.pop("float32")
                for dtype, (data, encode, next_click) in results.items():
                    a, b = reference["pred"].astype(bool), data["pred"].astype(bool)
                    dice = 2 * (a & b).sum() / max(1, a.sum() + b.sum())
                    difference = float(np.abs(reference["logits"] - data["logits"]).max())
                    print(f"| {name} | {image.name} | {dtype} | {dice:.4f} | {difference:.3f} | {encode32:.2f} | {encode:.2f} | "
                          f"{encode32 / encode:.2f}x | {next32:.3f} | {next_click:.3f} |", flush=True)


if __name__ == "__main__":
    main()
