"""The GPU path in a few minutes, at engine level (no monailabel, no HTTP): for each model and
dtype, encoder and decoder latency; then engine-level clicks on a 512 x 512 x 300 volume: first
click (read + encode + decode + mask), second click in the same window or slice, and the
uncertainty ensemble with N = 8 and N = 100; SAM3D's decoder training iteration; FastSAM3D's encoder
distillation: the teacher's targets per crop and one student iteration. Seeded full-size weights in
the official layout.

    bench/gpu_check.sh [--out DIR]     # on a GPU machine (wheels from .whl/ when present)
    bench/gpu_check.sh --dry-run       # small configurations on the CPU: the suite runs this

Prints a markdown table per section and writes gpu_check.json to --out.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from samlabel.attention import flash_available
from samlabel.distillation import depth_pairs, student_loss, teacher_outputs
from samlabel.modeling.build_sam3d_seg import build_sam3d_seg
from samlabel.predictor import SamPredictor3D
from samlabel.predictor2d import SamPredictor2D
from samlabel.registry import get_spec
from samlabel.request import ClickRequest
from samlabel.sam3d_training import deep_supervision_loss, make_optimizer
from samlabel.seeded import seeded_state_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Small configurations with the same structure, for --dry-run on the CPU.
SMALL = {"fastsam3d": dict(embed_dim=48, depth=3, num_heads=2, prompt_dim=48),
         "sam_med3d": dict(embed_dim=48, depth=4, num_heads=2, window_size=4, global_attn_indexes=(3,), prompt_dim=48),
         "medsam": dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), prompt_dim=32, decoder_mlp_dim=64,
                        iou_head_hidden_dim=32),
         "sam_med2d": dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), prompt_dim=32, decoder_mlp_dim=64,
                           iou_head_hidden_dim=32),
         "sam3d_synapse": dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))}


def synchronise(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronise(device)
        start = time.perf_counter()
        fn()
        synchronise(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seeded_model(name, dry_run, device):
    spec = get_spec(name)
    model = spec.builder(**(SMALL[name] if dry_run else {}))
    model.load_state_dict(seeded_state_dict({k: v.shape for k, v in model.state_dict().items()}, 0))
    return spec, model.to(device).eval()


def network_latency(name, dtype, dry_run, device, repeats):
    spec, model = seeded_model(name, dry_run, device)
    if spec.engine.dimension == 3:
        predictor = SamPredictor3D(model, dtype)
        size = spec.input_size[0]
        volume = torch.randn(size, size, size, generator=torch.Generator().manual_seed(0))
        encode = lambda: predictor.set_volume(volume)  # noqa: E731
        points, labels = torch.tensor([[[60.0, 64.0, 70.0]]], device=device), torch.ones(1, 1, dtype=torch.long, device=device)
        encode()
        decode = lambda: predictor.predict_torch(points, labels)  # noqa: E731
    else:
        predictor = SamPredictor2D(model, spec.preprocess, dtype)
        slice_255 = np.random.default_rng(0).uniform(0, 255, (512, 512)).astype(np.float32)
        encode = lambda: predictor.set_image(slice_255)  # noqa: E731
        encode()
        points, labels = torch.tensor([[[100.0, 120.0]]], device=device), torch.ones(1, 1, dtype=torch.long, device=device)
        boxes = torch.tensor([[80.0, 90.0, 180.0, 200.0]], device=device)
        decode = lambda: predictor.predict_torch(None, None, boxes, None) if spec.prompt.takes_box else \
            predictor.predict_torch(points, labels, None, None)  # noqa: E731
    return median_seconds(encode, repeats, device), median_seconds(decode, repeats, device)


def sam3d_costs(dtype, dry_run, device, repeats):
    """SAM3D (Synapse): encoder seconds per 176^2 slice, decoder seconds per 64 x 176 x 176 window,
    and one decoder training iteration (batch 2, deep supervision, the official Dice + CE, SGD)."""
    patch = (8, 64, 64) if dry_run else (64, 176, 176)
    model = build_sam3d_seg(img_size=patch[1], num_classes=14, **(SMALL["sam3d_synapse"] if dry_run else {}))
    model.load_state_dict(seeded_state_dict({k: v.shape for k, v in model.state_dict().items()}, 3))
    model = model.to(device).eval()
    slices = torch.randn(1, 1, min(8, patch[0]), *patch[1:], device=device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        encoder = median_seconds(lambda: model.encode(slices), repeats, device) / slices.shape[2]
        features = model.encode(torch.randn(1, 1, *patch, device=device))
        with torch.no_grad():
            decoder = median_seconds(lambda: model.decode(features), repeats, device)
    batch = features.float().repeat(2, 1, 1, 1, 1)
    target = torch.randint(0, 14, (2, *patch), device=device)
    optimizer = make_optimizer(model.decoder.train(), 1e-2)

    def iteration():
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            outputs = model.decode(batch, deep_supervision=True)
        deep_supervision_loss([o.float() for o in outputs], target, batch_dice=False).backward()
        optimizer.step()

    return encoder, decoder, median_seconds(iteration, repeats, device)


def distillation_costs(dtypes, dry_run, device, repeats):
    """FastSAM3D's encoder distillation from SAM-Med3D-turbo: the teacher's targets for one 128^3 crop
    (neck and the six paired block outputs, float32 as the run computes them), and per dtype one
    student iteration (batch 1, the neck and all six block pairs in the loss, AdamW)."""
    teacher = seeded_model("sam_med3d", dry_run, device)[1].image_encoder
    student = seeded_model("fastsam3d", dry_run, device)[1].image_encoder.train()
    pairs = depth_pairs(len(student.blocks), len(teacher.blocks))
    volume = torch.randn(1, 1, *get_spec("fastsam3d").input_size, generator=torch.Generator().manual_seed(0)).to(device)
    targets = lambda: teacher_outputs(teacher, volume, [t for _, t in pairs])  # noqa: E731
    teacher_seconds = median_seconds(targets, repeats, device)
    neck, blocks = targets()
    optimizer = torch.optim.AdamW(student.parameters(), 8e-4, weight_decay=0.1)

    def iteration(dtype):
        loss, _ = student_loss(student, volume, neck, blocks, pairs, dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return teacher_seconds, {name: median_seconds(lambda: iteration(dtype), repeats, device) for name, dtype in dtypes.items()}


def write_volume(path, shape):
    """A CT-like volume: air, a body, a bright ellipsoid; LPS, anisotropic."""
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    body = (i ** 2 + j ** 2) < 0.8
    organ = ((i - 0.2) / 0.25) ** 2 + (j / 0.2) ** 2 + (k / 0.3) ** 2 < 1
    volume = np.where(organ, 180, np.where(body, 40, -1000)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.diag([-0.8, -0.8, 1.0, 1.0])), str(path))


def engine_clicks(name, dtype, dry_run, device, repeats, image, shape, ensemble_sizes):
    spec, model = seeded_model(name, dry_run, device)
    predictor = (SamPredictor3D(model, dtype) if spec.engine.dimension == 3 else SamPredictor2D(model, spec.preprocess, dtype))
    engine = spec.engine(spec, predictor=predictor, device=str(device), dtype=dtype)
    centre = (int(shape[0] * 0.6), shape[1] // 2, shape[2] // 2)
    first_click = ClickRequest(foreground=(centre,), client="gpu-check")
    start = time.perf_counter()
    engine.segment(str(image), first_click)
    synchronise(device)
    first = time.perf_counter() - start
    second_click = replace(first_click, foreground=(centre, (centre[0] + 2, centre[1] + 1, centre[2])))
    second = median_seconds(lambda: engine.segment(str(image), second_click, commit=False), repeats, device)
    ensembles = {n: median_seconds(lambda: engine.segment(str(image), replace(second_click, ensemble_size=n), commit=False),
                                   max(1, repeats // 2), device) for n in ensemble_sizes}
    return first, second, ensembles


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="small configurations and volume, on the CPU")
    parser.add_argument("--models", default="fastsam3d,sam_med3d,medsam,sam_med2d")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    repeats = args.repeats or (2 if args.dry_run else 10)
    shape = (64, 64, 40) if args.dry_run else (512, 512, 300)
    ensemble_sizes = (2, 4) if args.dry_run else (8, 100)
    models = args.models.split(",")
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "flash_attn": flash_available(), "dry_run": args.dry_run,
              "volume": list(shape), "networks": {}, "clicks": {}}
    print(f"# gpu_check: {report['device']}, torch {torch.__version__}, flash-attn {report['flash_attn']}, "
          f"dry run {args.dry_run}, medians of {repeats}")
    print("\n| model | dtype | encoder (s) | decoder (s) |\n|---|---|---|---|")
    for name in models:
        for dtype_name, dtype in DTYPES.items():
            encoder, decoder = network_latency(name, dtype, args.dry_run, device, repeats)
            report["networks"][f"{name}/{dtype_name}"] = {"encoder_s": encoder, "decoder_s": decoder}
            print(f"| {name} | {dtype_name} | {encoder:.4f} | {decoder:.4f} |", flush=True)
    print("\n| SAM3D (Synapse) | dtype | encoder per slice (s) | decoder per window (s) | training iteration, batch 2 (s) |"
          "\n|---|---|---|---|---|")
    for dtype_name, dtype in DTYPES.items():
        encoder, decoder, iteration = sam3d_costs(dtype, args.dry_run, device, repeats)
        report["networks"][f"sam3d_synapse/{dtype_name}"] = {"encoder_slice_s": encoder, "decoder_window_s": decoder,
                                                             "train_iteration_s": iteration}
        print(f"| sam3d_synapse | {dtype_name} | {encoder:.4f} | {decoder:.4f} | {iteration:.4f} |", flush=True)
    teacher_seconds, student_seconds = distillation_costs(DTYPES, args.dry_run, device, repeats)
    report["distillation"] = {"teacher_targets_s": teacher_seconds, "student_iteration_s": student_seconds}
    print("\n| FastSAM3D distillation | teacher targets per crop, float32 (s) | "
          + " | ".join(f"student iteration, {name} (s)" for name in student_seconds) + " |\n|---|---|"
          + "---|" * len(student_seconds))
    print(f"| sam_med3d -> fastsam3d | {teacher_seconds:.4f} | " + " | ".join(f"{t:.4f}" for t in student_seconds.values())
          + " |", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        image = Path(folder) / "volume.nii.gz"
        write_volume(image, shape)
        header = " | ".join(f"uncertainty N={n} (s)" for n in ensemble_sizes)
        print(f"\n| model | dtype | first click (s) | next click (s) | {header} |\n|---|---|---|---|" + "---|" * len(ensemble_sizes))
        for name in models:
            for dtype_name, dtype in DTYPES.items():
                first, second, ensembles = engine_clicks(name, dtype, args.dry_run, device, repeats, image, shape, ensemble_sizes)
                report["clicks"][f"{name}/{dtype_name}"] = {"first_s": first, "next_s": second,
                                                            **{f"uncertainty_{n}_s": t for n, t in ensembles.items()}}
                cells = " | ".join(f"{t:.4f}" for t in ensembles.values())
                print(f"| {name} | {dtype_name} | {first:.3f} | {second:.4f} | {cells} |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
