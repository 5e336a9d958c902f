"""Every row of the latency table of the first-click issue (#16), in one run, next to its yardstick.

    .venv/bin/python bench/bench_latency.py [--repeats 5] [--app apps/fastsam3d] [--json out.json] \
        [--official-segment-anything <checkout>] [--official-sam-med2d <checkout>]

Rows (CPU threads as the machine gives, at most 2; seeded full-size weights):
  FastSAM3D next click       HTTP, 512 x 512 x 300 CT, same window   | MONAI Label's uncached request path
  first click after opening  HTTP, FastSAM3D, the image read on open | the first click on a cold image
  MedSAM first click         HTTP, a new slice of an opened image    | the official code per slice
  SAM-Med2D same-slice click HTTP                                     | the official code per slice
  uncertainty N=100 / N=8    engine, FastSAM3D, same window           | the Slicer extension (the issue's
                             (float32 members, and bfloat16)           2.78 s) / a normal click (x3)
The parts come from bench_clicks.py, bench_slices.py and bench_uncertainty.py. To measure another
version of the app in the same session, run this file with PYTHONPATH=<its lib> and --app <its app>.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

import bench_clicks
import bench_slices
import bench_uncertainty

SLICER_EXTENSION_N100_S = 2.78  # FastSAM-3DSlicer's uncertainty, measured in the issue on this machine kind
GOALS = {"next": 0.1, "after_opening": 1.5, "medsam_first": 3.0, "sam_med2d_same": 0.05, "n100": 0.7, "n8_ratio": 3.0}


def measure(args) -> dict:
    threads = min(2, os.cpu_count())
    torch.set_num_threads(threads)
    official = {"medsam": args.official_segment_anything, "sam_med2d": args.official_sam_med2d}
    results = {"threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for part in ("clicks", "slices", "uncertainty", "uncertainty_bf16"):
            (work / part).mkdir()
        results["clicks"] = bench_clicks.measure(work / "clicks", ["fastsam3d"], args.repeats, args.app)
        results["slices"] = bench_slices.measure(work / "slices", args.repeats, official, args.app)
        results["uncertainty"] = bench_uncertainty.measure(work / "uncertainty", ["fastsam3d"], [8, 100], args.repeats)
        try:
            results["uncertainty_bf16"] = bench_uncertainty.measure(work / "uncertainty_bf16", ["fastsam3d"], [8, 100],
                                                                    args.repeats, ensemble_dtype=torch.bfloat16)
        except TypeError:  # an earlier version of the app, without ensemble_dtype
            pass
    return results


def table(results: dict) -> str:
    clicks, slices = results["clicks"]["fastsam3d"], results["slices"]
    rows = [("FastSAM3D, next click in the window", clicks["next"], f"stock request {clicks['uncached']:.2f} s",
             GOALS["next"]),
            ("first click on a newly opened image", clicks["after_opening"], f"cold image {clicks['first']:.2f} s",
             GOALS["after_opening"]),
            ("MedSAM, first click on a slice", slices["medsam"]["first"], official_cell(slices["medsam"]),
             GOALS["medsam_first"]),
            ("SAM-Med2D, same-slice click", slices["sam_med2d"]["same"], official_cell(slices["sam_med2d"]),
             GOALS["sam_med2d_same"])]
    for key, label in (("uncertainty", "float32"), ("uncertainty_bf16", "bfloat16")):
        if key not in results:
            continue
        row = results[key]["fastsam3d"]
        rows += [(f"uncertainty N=100 (FastSAM3D), {label} members", row[100],
                  f"Slicer extension {SLICER_EXTENSION_N100_S} s (issue)", GOALS["n100"]),
                 (f"uncertainty N=8, {label} members", row[8], f"normal click {row['normal']:.3f} s "
                  f"({row[8] / row['normal']:.1f}x)", GOALS["n8_ratio"] * row["normal"])]
    lines = [f"torch threads {results['threads']}", "| measure | now (s) | yardstick in the same run | goal (s) | met |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {yardstick} | {goal:.3f} | {'yes' if value <= goal else 'no'} |"
              for name, value, yardstick, goal in rows]
    return "\n".join(lines)


def official_cell(row: dict) -> str:
    return f"official per slice {row['official']:.2f} s" if "official" in row else "official: no checkout given"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--app", type=Path, default=bench_clicks.APP)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--official-segment-anything", type=Path, help="checkout of MedSAM's segment-anything")
    parser.add_argument("--official-sam-med2d", type=Path, help="checkout of OpenGVLab/SAM-Med2D")
    args = parser.parse_args()
    results = measure(args)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
