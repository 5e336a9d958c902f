"""Every row of the latency table of the first-click issue (#16), in one run, next to its yardstick.

    .venv/bin/python bench/bench_latency.py [--repeats 5] [--app apps/fastsam3d] [--json out.json] [--skip-floors] \
        [--official-segment-anything <checkout>] [--official-sam-med2d <checkout>]

Rows (CPU threads as the machine gives, at most 2; seeded full-size weights):
  FastSAM3D next click       HTTP, 512 x 512 x 300 CT, same window   | MONAI Label's uncached request path
  first click after opening  HTTP, FastSAM3D, the image read on open | the first click on a cold image
  MedSAM first click         HTTP, a new slice of an opened image    | the official code per slice
                             (float32, and --conf medsam_dtype bfloat16)
  SAM-Med2D same-slice click HTTP                                     | the official code per slice
  uncertainty N=100 / N=8    engine, FastSAM3D, same window           | the Slicer extension (the issue's
                             (float32 members, and bfloat16)           2.78 s) / a normal click (x3)
The parts come from bench_clicks.py, bench_slices.py and bench_uncertainty.py. To measure another
version of the app in the same session, run this file with PYTHONPATH=<its lib> and --app <its app>.

Floors, for the rows that miss their goal: a click's parts at engine level on the same CT (decoder,
mapping back onto the image, writing the NRRD; the HTTP row's remainder is the request path), and
an encoder's floating-point operations (torch's FlopCounterMode) over this machine's matrix-product
rate (a 4096 x 768 @ 768 x 3072 product, ViT-B's MLP) in float32 and bfloat16.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import bench_clicks
import bench_slices
import bench_uncertainty
from samlabel.checkpoint import load_model
from samlabel.engine2d import SliceSegmenter
from samlabel.engine3d import ClickSegmenter3D
from samlabel.nrrd_io import write_nrrd
from samlabel.registry import get_spec
from samlabel.request import ClickRequest

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
        (work / "slices_bf16").mkdir()
        try:  # MedSAM's encoder in bfloat16 (--conf medsam_dtype bfloat16)
            results["medsam_bf16"] = bench_slices.measure(work / "slices_bf16", args.repeats, {}, args.app, ["medsam"],
                                                          {"medsam_dtype": "bfloat16"})["medsam"]
        except RuntimeError:  # an earlier version of the app, without <model>_dtype: its server does not start
            pass
        results["uncertainty"] = bench_uncertainty.measure(work / "uncertainty", ["fastsam3d"], [8, 100], args.repeats)
        try:
            results["uncertainty_bf16"] = bench_uncertainty.measure(work / "uncertainty_bf16", ["fastsam3d"], [8, 100],
                                                                    args.repeats, ensemble_dtype=torch.bfloat16)
        except TypeError:  # an earlier version of the app, without ensemble_dtype
            pass
        if not args.skip_floors:
            (work / "floors").mkdir()
            bench_clicks.make_ct(work / "floors" / "ct.nii.gz")
            results["floors"] = measure_floors(work / "floors", work / "floors" / "ct.nii.gz", args.repeats)
    return results


def click_parts(engine, image: str, clicks, repeats: int, work: Path) -> dict:
    """Median seconds of a click's parts at engine level: predict (decoder; the encoder ran before),
    post (mapping back onto the image), write (the gzip NRRD a Slicer client gets)."""
    engine.segment(image, clicks[0])  # encodes
    parts = {"decoder": [], "mapping": [], "writing": []}
    for request in clicks[1:repeats + 1]:
        started = time.perf_counter()
        data = engine.predict(image, request)
        decoded = time.perf_counter()
        data = engine.post(data)
        mapped = time.perf_counter()
        write_nrrd(str(work / "result.nrrd"), data["pred"], data["affine"])
        parts["decoder"].append(decoded - started)
        parts["mapping"].append(mapped - decoded)
        parts["writing"].append(time.perf_counter() - mapped)
        engine.commit(data)
    return {part: statistics.median(times) for part, times in parts.items()}


def matmul_rate(dtype: torch.dtype) -> float:
    """This machine's FLOP/s on ViT-B's MLP product (4096 x 768 @ 768 x 3072), median of 5."""
    a, b = torch.randn(4096, 768, dtype=dtype), torch.randn(768, 3072, dtype=dtype)
    a @ b
    times = []
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * 4096 * 768 * 3072 / statistics.median(times)


def encoder_floor(name: str, checkpoint: Path) -> dict:
    """The encoder's FLOPs, its floor at this machine's matrix-product rate, and its measured time, per dtype."""
    model, spec = load_model(get_spec(name), checkpoint), get_spec(name)
    image = torch.rand(1, 3, *spec.input_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.image_encoder(image)
    flops = counter.get_total_flops()
    row = {"gflops": flops / 1e9}
    for label, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            times = []
            for _ in range(2):
                started = time.perf_counter()
                model.image_encoder(image)
                times.append(time.perf_counter() - started)
        row[label] = {"floor": flops / matmul_rate(dtype), "measured": min(times)}
    return row


def ensemble_floor(checkpoint: Path, members: int = 100) -> dict:
    """FLOPs of FastSAM3D's decoder on `members` prompt sets sharing one embedding and mask prompt
    (what an ensemble decodes), and their floor at this machine's matrix-product rate, per dtype."""
    from samlabel.predictor import SamPredictor3D

    predictor = SamPredictor3D(load_model(get_spec("fastsam3d"), checkpoint))
    predictor.set_embedding(torch.randn(1, 384, 8, 8, 8))
    points, labels = torch.rand(members, 7, 3) * 128, torch.ones(members, 7, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:
        predictor.predict_torch(points, labels, torch.randn(1, 1, 32, 32, 32))
    flops = counter.get_total_flops()
    return {"gflops": flops / 1e9, **{label: flops / matmul_rate(dtype) for label, dtype in
                                      (("float32", torch.float32), ("bfloat16", torch.bfloat16))}}


def measure_floors(work: Path, ct: Path, repeats: int) -> dict:
    from samlabel.seeded import write_seeded_checkpoints  # not in earlier versions: run those with --skip-floors

    paths = write_seeded_checkpoints(work, {"fastsam3d": 0, "sam_med2d": 0, "medsam": 0})
    centre = [200, 230, 150]
    refinements = [ClickRequest(foreground=((*centre,),), client="floor")]
    for step in range(repeats):
        last = refinements[-1]
        refinements.append(ClickRequest(foreground=last.foreground + ((centre[0] + 3 * (step + 1), centre[1], centre[2]),),
                                        client="floor"))
    same_slice = [ClickRequest(foreground=((*centre,), (205 + step, 235, 150)), client="floor", slice_index=150)
                  for step in range(repeats + 1)]
    return {"fastsam3d": click_parts(ClickSegmenter3D(get_spec("fastsam3d"), paths["fastsam3d"]), str(ct), refinements,
                                     repeats, work),
            "sam_med2d": click_parts(SliceSegmenter(get_spec("sam_med2d"), paths["sam_med2d"]), str(ct), same_slice,
                                     repeats, work),
            "medsam_encoder": encoder_floor("medsam", paths["medsam"]),
            "ensemble_n100": ensemble_floor(paths["fastsam3d"])}


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
    if "medsam_bf16" in results:
        rows.insert(3, ("MedSAM, first click on a slice, medsam_dtype bfloat16", results["medsam_bf16"]["first"],
                        official_cell(slices["medsam"]), GOALS["medsam_first"]))
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
    if "floors" not in results:
        return "\n".join(lines)
    floors = results["floors"]
    lines += ["", "Floors: a click's parts at engine level (median s); HTTP: the row's time minus the parts",
              "| click | decoder | mapping back | writing the NRRD | HTTP and the request path |", "|---|---|---|---|---|"]
    for name, label, total in (("fastsam3d", "FastSAM3D next click", clicks["next"]),
                               ("sam_med2d", "SAM-Med2D same-slice click", slices["sam_med2d"]["same"])):
        parts = floors[name]
        lines.append(f"| {label} | {parts['decoder']:.3f} | {parts['mapping']:.3f} | {parts['writing']:.3f} "
                     f"| {total - sum(parts.values()):.3f} |")
    encoder = floors["medsam_encoder"]
    lines += ["", f"MedSAM's encoder: {encoder['gflops']:.0f} GFLOP per slice",
              "| dtype | floor at this machine's matrix-product rate (s) | measured (s) |", "|---|---|---|"]
    lines += [f"| {dtype} | {encoder[dtype]['floor']:.2f} | {encoder[dtype]['measured']:.2f} |"
              for dtype in ("float32", "bfloat16")]
    ensemble = floors["ensemble_n100"]
    lines += ["", f"FastSAM3D's decoder on 100 members: {ensemble['gflops']:.0f} GFLOP; floor at this machine's "
              f"matrix-product rate {ensemble['float32']:.2f} s (float32), {ensemble['bfloat16']:.2f} s (bfloat16)"]
    return "\n".join(lines)


def official_cell(row: dict) -> str:
    return f"official per slice {row['official']:.2f} s" if "official" in row else "official: no checkout given"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--app", type=Path, default=bench_clicks.APP)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-floors", action="store_true", help="only the rows (e.g. for an earlier version)")
    parser.add_argument("--official-segment-anything", type=Path, help="checkout of MedSAM's segment-anything")
    parser.add_argument("--official-sam-med2d", type=Path, help="checkout of OpenGVLab/SAM-Med2D")
    args = parser.parse_args()
    results = measure(args)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
