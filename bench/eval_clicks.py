"""Clicks-to-Dice of a 3D click model on labelled images: Dice after 1, 3 and 5 simulated clicks
and NoC@80 / NoC@90 (clicks to reach Dice 0.8 / 0.9, capped at --max-clicks), per structure and
the mean (samlabel.click_simulation: the standard simulated clicks, through the real engine).

    .venv/bin/python bench/eval_clicks.py --images DIR [--labels DIR] [--model fastsam3d]
        [--checkpoint FILE] [--weights latest|official|<file>.pth] [--device cpu] [--max-clicks 20]
        [--json OUT] [--small]

--images: a folder of images (NIfTI, NRRD), e.g. a MONAI Label datastore (studies folder);
--labels: their label maps under the same file names (default: <images>/labels/final, the
datastore's final labels). Each nonzero value of a label is one structure. --weights chooses as
the app's `--conf <model>_weights` does (fine-tuned files under <checkpoint folder>/trained/<model>/),
so the same command measures before and after fine-tuning. --small: the checkpoint holds
bench/gpu_check.py's small configuration of the model (tests, dry runs).
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from samlabel.click_simulation import MAX_CLICKS, evaluate
from samlabel.registry import get_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check's SMALL, also when imported by the tests
APP_MODELS = Path(__file__).resolve().parents[1] / "apps" / "fastsam3d" / "model"
EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


def stem(path: Path) -> str:
    return next((path.name[: -len(e)] for e in EXTENSIONS if path.name.endswith(e)), "")


def labelled_pairs(images: Path, labels: Path) -> list:
    """(image path, label path) of every image with a label of the same name (extensions may differ)."""
    found = {stem(p): p for p in sorted(labels.iterdir()) if p.is_file() and stem(p)} if labels.is_dir() else {}
    return [(str(p), str(found[stem(p)])) for p in sorted(images.iterdir()) if p.is_file() and stem(p) in found]


def model_spec(name: str, small: bool):
    spec = get_spec(name)
    if spec.family != "clicks3d":
        raise SystemExit(f"{name} is not a 3D click model")
    if small:
        from gpu_check import SMALL

        spec = replace(spec, builder=partial(spec.builder, **SMALL[name]))
    return spec


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path)
    parser.add_argument("--model", default="fastsam3d")
    parser.add_argument("--checkpoint", type=Path, help="the official file (default: apps/fastsam3d/model/<its name>)")
    parser.add_argument("--weights", default="latest", help="latest, official or a file name under trained/<model>/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-clicks", type=int, default=MAX_CLICKS)
    parser.add_argument("--json", type=Path, help="write the result here too")
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)

    spec = model_spec(args.model, args.small)
    checkpoint = args.checkpoint or APP_MODELS / spec.checkpoint_file
    pairs = labelled_pairs(args.images, args.labels or args.images / "labels" / "final")
    if not pairs:
        raise SystemExit(f"no image of {args.images} has a label of the same name in {args.labels or args.images / 'labels' / 'final'}")
    engine = spec.engine(spec, checkpoint, device=args.device, weights=args.weights)
    started = time.perf_counter()
    result = evaluate(engine, pairs, args.max_clicks)
    result.update(model=spec.name, weights=engine.weights_name(), device=args.device,
                  seconds=round(time.perf_counter() - started, 1))

    print(f"{spec.name} ({result['weights']}) on {len(pairs)} images, {len(result['structures'])} structures, "
          f"{args.device}, {result['seconds']} s")
    columns = [key for key in result["mean"]]
    print("| image | structure | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for row in result["structures"]:
        print(f"| {Path(row['image']).name} | {row['structure']} | " + " | ".join(str(row[c]) for c in columns) + " |")
    print("| **mean** | | " + " | ".join(str(result["mean"][c]) for c in columns) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
