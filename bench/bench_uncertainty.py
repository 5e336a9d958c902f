"""Cost of self-ensembling against a normal click, for the 3D models on CPU.

    .venv/bin/python bench/bench_uncertainty.py [--repeats 5] [--sizes 8,16,100] [--ensemble-dtype bfloat16]

A seeded full-size checkpoint, the sample CT (171 x 143 x 57, oblique LPS); the window's
embedding is cached first, so every timed call is a click in the same window: decoder and mapping
back only (normal), or N decoder runs in one batch + statistics + the std map (ensemble).
"""

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from samlabel.checkpoint import expected_shapes
from samlabel.engine3d import ClickSegmenter3D
from samlabel.registry import get_spec
from samlabel.request import ClickRequest
from samlabel.seeded import save_in_official_layout, seeded_state_dict
from bench_networks import median_seconds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import sample_studies  # noqa: E402


def measure(work: Path, models, sizes, repeats: int, **engine_options) -> dict:
    """Per model: {"normal": s, N: s for N in sizes}, engine level, medians of repeats."""
    ct = work / sample_studies.CT_NAME
    sample_studies.write_ct(ct)
    rows = {}
    for name in models:
        spec = get_spec(name)
        checkpoint = work / spec.checkpoint_file
        save_in_official_layout(spec, seeded_state_dict(expected_shapes(spec), 0), checkpoint)
        engine = ClickSegmenter3D(spec, checkpoint, **engine_options)
        click = ClickRequest(foreground=((85, 71, 28),), client="user")
        engine.segment(str(ct), click)  # encodes the window once
        rows[name] = {"normal": median_seconds(lambda: engine.segment(str(ct), click, commit=False), repeats)}
        for n in sizes:
            ensembled = replace(click, ensemble_size=n)
            rows[name][n] = median_seconds(lambda: engine.segment(str(ct), ensembled, commit=False), repeats)
        assert engine.encoder_runs == 1
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="8,16,100")
    parser.add_argument("--models", default="fastsam3d,sam_med3d")
    parser.add_argument("--ensemble-dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sizes = [int(n) for n in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(tmp), args.models.split(","), sizes, args.repeats,
                       ensemble_dtype=getattr(torch, args.ensemble_dtype))
    print(f"torch threads {torch.get_num_threads()}, medians of {args.repeats}, same-window clicks, "
          f"members in {args.ensemble_dtype}")
    print("| model | normal click (s) | " + " | ".join(f"N={n} (s) | ratio" for n in sizes) + " |")
    print("|---|---|" + "---|---|" * len(sizes))
    for name, row in rows.items():
        print(f"| {name} | {row['normal']:.3f} | " + " | ".join(f"{row[n]:.3f} | {row[n] / row['normal']:.1f}x" for n in sizes)
              + " |")


if __name__ == "__main__":
    main()
