"""Cost of self-ensembling against a normal click, for the 3D models on CPU.

    .venv/bin/python bench/bench_uncertainty.py [--repeats 5] [--sizes 8,16,100]

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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="8,16,100")
    parser.add_argument("--models", default="fastsam3d,sam_med3d")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sizes = [int(n) for n in args.sizes.split(",")]
    print(f"torch threads {torch.get_num_threads()}, medians of {args.repeats}, same-window clicks")
    print("| model | normal click (s) | " + " | ".join(f"N={n} (s) | ratio" for n in sizes) + " |")
    print("|---|---|" + "---|---|" * len(sizes))
    with tempfile.TemporaryDirectory() as tmp:
        ct = Path(tmp) / sample_studies.CT_NAME
        sample_studies.write_ct(ct)
        for name in args.models.split(","):
            spec = get_spec(name)
            checkpoint = Path(tmp) / spec.checkpoint_file
            save_in_official_layout(spec, seeded_state_dict(expected_shapes(spec), 0), checkpoint)
            engine = ClickSegmenter3D(spec, checkpoint)
            click = ClickRequest(foreground=((85, 71, 28),), client="user")
            engine.segment(str(ct), click)  # encodes the window once
            normal = median_seconds(lambda: engine.segment(str(ct), click, commit=False), args.repeats)
            cells = [f"{name}", f"{normal:.3f}"]
            for n in sizes:
                ensembled = replace(click, ensemble_size=n)
                ensemble = median_seconds(lambda: engine.segment(str(ct), ensembled, commit=False), args.repeats)
                cells += [f"{ensemble:.3f}", f"{ensemble / normal:.1f}x"]
            assert engine.encoder_runs == 1
            print("| " + " | ".join(cells) + " |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
