"""FastSAM3D's encoder distillation on the CPU (samlabel.distillation, no monailabel): the teacher's
targets per crop, the student's iteration time, and how far the neck MSE falls in N steps.

    .venv/bin/python bench/bench_distill.py [--configs tiny,full] [--steps 50,20] [--json out.json]

Configurations: `tiny` is the tests' (bench/gpu_check.py's SMALL FastSAM3D and SAM-Med3D at a 64^3
window); `full` is the released pair: the 6-block FastSAM3D student and the 12-block SAM-Med3D-turbo
teacher at 128^3, batch 1. The teacher has seeded weights; the student starts from scratch (default
init, as upstream's distillation.py). Data: two synthetic CTs, two crops each (a label-centred one
and one at a random point), cached on disk as the task caches them; the run is the task's loop (neck
MSE, AdamW lr 8e-4, weight decay 0.1, no accumulation; "loop": its mean seconds per step, reading the
targets from disk). Iteration times are medians of 5 on one crop, with the neck alone and with every
block pair in the loss (the layer-wise option's last level; six pairs for `full`).
"""

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from samlabel.distillation import (DistillationSettings, TeacherTargets, depth_pairs, distill, image_crops,
                                   mean_neck_mse, student_loss)
from samlabel.images import ImageCache
from samlabel.registry import get_spec
from samlabel.seeded import seeded_state_dict

from gpu_check import SMALL, median_seconds, write_volume

TINY_WINDOW = 64


def specs(config):
    """(student spec, teacher spec) of a configuration."""
    student, teacher = get_spec("fastsam3d"), get_spec("sam_med3d")
    if config == "full":
        return student, teacher
    small = {s.name: replace(s, builder=partial(s.builder, img_size=TINY_WINDOW, **SMALL[s.name]),
                             input_size=(TINY_WINDOW,) * 3) for s in (student, teacher)}
    return small["fastsam3d"], small["sam_med3d"]


def crops_of(folder: Path, images: ImageCache, spec):
    crops = []
    for case, shape in enumerate(((160, 160, 90), (140, 150, 80))):
        path = folder / f"ct{case}.nii.gz"
        write_volume(path, shape)
        image = images.get(str(path))
        crops += image_crops(f"ct{case}", str(path), image, image.array > 100, 2, spec, seed=case)  # the organ
    return crops


def run(config, steps, folder: Path):
    student_spec, teacher_spec = specs(config)
    device = torch.device("cpu")
    teacher = teacher_spec.builder()
    teacher.load_state_dict(seeded_state_dict({k: v.shape for k, v in teacher.state_dict().items()}, 12))
    teacher = teacher.image_encoder.eval()
    torch.manual_seed(0)
    student = student_spec.builder().image_encoder
    pairs = depth_pairs(len(student.blocks), len(teacher.blocks))
    images = ImageCache()
    crops = crops_of(folder, images, student_spec)

    started = time.perf_counter()
    store = TeacherTargets(folder / "targets", config, [t for _, t in pairs])
    cached = store.prepare(crops, images.get, student_spec.preprocess, lambda: teacher, device)
    teacher_seconds = (time.perf_counter() - started) / len(crops)

    before = mean_neck_mse(student, cached, device)
    history, _ = distill(student, cached, pairs, DistillationSettings(max_epochs=1, iterations_per_epoch=steps))
    after = mean_neck_mse(student, cached, device)

    neck, blocks = cached[0].targets([t for _, t in pairs], device)
    volume = cached[0].volume(device)
    optimizer = torch.optim.AdamW(student.parameters(), 8e-4, weight_decay=0.1)

    def iteration(active):
        student_loss(student.train(), volume, neck, blocks, active)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"config": config, "crops": len(crops), "steps": steps, "teacher_targets_s_per_crop": teacher_seconds,
            "loop_s_per_step": history.seconds[0] / steps, "iteration_s": median_seconds(lambda: iteration([]), 5, device),
            "all_pairs_iteration_s": median_seconds(lambda: iteration(pairs), 5, device),
            "neck_mse_before": before, "neck_mse_after": after,
            "crop_bytes": statistics.mean(sum(p.stat().st_size for p in c.folder.iterdir()) for c in cached)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,full")
    parser.add_argument("--steps", default="50,20", help="steps per configuration, in the same order")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configs, steps = args.configs.split(","), [int(s) for s in args.steps.split(",")]
    print(f"# bench_distill: torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n| config | crops | teacher targets (s/crop) | iteration, neck (s) | iteration, all block pairs + neck (s) "
          "| steps | loop (s/step) | neck MSE before | neck MSE after | cached per crop (MB) |\n|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for config, n in zip(configs, steps):
        with tempfile.TemporaryDirectory() as folder:
            result = run(config, n, Path(folder))
        results.append(result)
        print(f"| {config} | {result['crops']} | {result['teacher_targets_s_per_crop']:.3f} | {result['iteration_s']:.3f} | "
              f"{result['all_pairs_iteration_s']:.3f} | {n} | {result['loop_s_per_step']:.3f} | {result['neck_mse_before']:.4f} | "
              f"{result['neck_mse_after']:.4f} | {result['crop_bytes'] / 1e6:.1f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
