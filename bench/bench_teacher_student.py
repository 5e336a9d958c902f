"""Teacher (SAM-Med3D-turbo) against student (FastSAM3D), before and after encoder distillation, in
clicks-to-Dice on held-out synthetic volumes: a small but complete run of the project's own loops.

    .venv/bin/python bench/bench_teacher_student.py [--json OUT] [--train-volumes 16] [--test-volumes 8]
        [--teacher-epochs 20] [--teacher-iterations 60] [--teacher-clicks 11] [--teacher-lr 1e-3]
        [--distill-epochs 60] [--layerwise 10] [--max-clicks 20] [--seed 0]

The defaults take about 4 minutes on 2 CPU threads (teacher fine-tuning 160 s, each distillation 27 s,
each evaluation 3 s).

No released checkpoint can be downloaded here, and seeded random weights would make a teacher / student
comparison meaningless, so the teacher is made competent first:

1. Teacher: bench/gpu_check.py's SMALL SAM-Med3D at a 64^3 window (the tests' configuration), seeded
   random weights, its prompt encoder and mask decoder fine-tuned by the project's click loop
   (samlabel.click_training.train_clicks: encoder frozen, random error clicks, DiceCE over the steps,
   lr x0.1 at 60 % and 90 % of the epochs) on the training volumes' structures, at a higher lr than
   upstream's 8e-5 (1e-3, as tests/test_click_training.py: seeded weights barely move at 8e-5 in a
   run this short). Its encoder stays the seeded random one: the decoder learns to read it.
2. Student: SMALL FastSAM3D at 64^3 as /train/fastsam3d_distill with start=scratch builds it (a
   fresh encoder, default init, seeded; the teacher's prompt encoder and mask decoder), evaluated as
   it is, then its encoder distilled from the teacher's (samlabel.distillation: TeacherTargets on disk,
   `distill`, the neck MSE, AdamW lr 8e-4, wd 0.1) on windows of the training volumes only, and
   evaluated again; a second fresh student with the layer-wise option (--layerwise E: one more block
   pair every E epochs).
3. Clicks-to-Dice (samlabel.click_simulation.evaluate, the evaluation behind bench/eval_clicks.py:
   the standard simulated clicks through the real click engine, each model loaded from its file in
   the official layout): teacher, student before, student after on HELD-OUT volumes (other seeds,
   other array shapes and voxel spacings than the training volumes), and the teacher on the
   training volumes (the check that it learned). Neck MSE against the teacher on the training
   windows and on held-out windows, before and after.

The training loops flush denormal floats to zero (samlabel.optimisation.denormals_flushed): the click loop
otherwise runs over 100x slower on a CPU while the decoder still predicts all background, with the same results.

Data: each volume holds two ellipsoids (random axes 7-18 mm, random orientation, different
intensities) on a smooth, noisy background; label values 1 and 2. Everything is seeded: a second
run gives the same numbers (the wall times aside).
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from samlabel.checkpoint import expected_shapes
from samlabel.click_simulation import MAX_CLICKS, evaluate
from samlabel.click_training import (ClickTrainingSettings, WindowEmbeddings, official_layout, structure_example,
                                     structure_window, train_clicks)
from samlabel.distillation import (Crop, DistillationSettings, TeacherTargets, depth_pairs, distill, distilled_checkpoint,
                                   image_crops, mean_neck_mse)
from samlabel.images import ImageCache
from samlabel.registry import get_spec
from samlabel.seeded import seeded_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import SMALL  # noqa: E402

WINDOW = 64  # voxels of 1.5 mm, as the tests: 8x fewer than the released 128^3, same structure
TRAIN_SEEDS, TEST_SEEDS = 1000, 2000  # volume k of a set: seed base + k
AXES_MM, GAP_MM = (8.0, 16.0), 4.0  # the ellipsoids' semi-axes; their least distance
TRAIN_GEOMETRY = dict(shape_low=(64, 64, 32), shape_high=(80, 80, 40), spacing=(1.2, 1.2, 2.0))
TEST_GEOMETRY = dict(shape_low=(80, 72, 40), shape_high=(96, 84, 50), spacing=(1.0, 1.1, 1.6))


def small_spec(name):
    spec = get_spec(name)
    return replace(spec, builder=partial(spec.builder, img_size=WINDOW, **SMALL[name]), input_size=(WINDOW,) * 3)


# ---- synthetic labelled volumes ----------------------------------------------------------------------------
def rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def synthetic_volume(seed, shape_low, shape_high, spacing):
    """(image int16, label uint8 with values 1, 2, affine): two ellipsoids at least GAP_MM apart (each
    whole, convex: its deepest voxel is its centre) on a smooth, noisy background, inside the volume."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(shape_low, shape_high))
    spacing = np.array(spacing, float)
    mm = np.stack(np.indices(shape), -1) * spacing  # voxel centres in mm
    extent = (np.array(shape) - 1) * spacing
    placed = []  # (centre, largest semi-axis, semi-axes, rotation)
    while len(placed) < 2:
        axes = rng.uniform(*AXES_MM, 3)
        for _ in range(100):
            centre = rng.uniform(axes.max() + 3, extent - axes.max() - 3)
            if all(np.linalg.norm(centre - c) > axes.max() + r + GAP_MM for c, r, _, _ in placed):
                placed.append((centre, axes.max(), axes, rotation(rng)))
                break
    label = np.zeros(shape, np.uint8)
    for value, (centre, _, axes, turn) in enumerate(placed, start=1):
        label[((((mm - centre) @ turn) / axes) ** 2).sum(-1) <= 1] = value
    coarse = torch.from_numpy(rng.normal(size=(1, 1, 4, 4, 4))).float()
    smooth = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    bright, dim = rng.uniform(170, 230), rng.uniform(100, 140)
    image = 40 + 15 * smooth + rng.normal(0, 12, shape) + np.select([label == 1, label == 2], [bright - 40, dim - 40], 0)
    affine = np.diag([*spacing, 1.0])
    return image.astype(np.int16), label, affine


def write_volumes(folder, count, seed_base, geometry):
    """[(image path, label path)] of `count` volumes written under folder/."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for k in range(count):
        image, label, affine = synthetic_volume(seed_base + k, **geometry)
        image_path, label_path = folder / f"vol{seed_base + k}.nii.gz", folder / f"vol{seed_base + k}_label.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), str(image_path))
        nib.save(nib.Nifti1Image(label, affine), str(label_path))
        pairs.append((str(image_path), str(label_path)))
    return pairs


def structures(images, pairs):
    """(image id, image path, StoredImage, label array) per labelled volume."""
    out = []
    for image_path, label_path in pairs:
        label = np.rint(images.get(label_path).array).astype(np.int64)
        out.append((Path(image_path).name.split(".")[0], image_path, images.get(image_path), label))
    return out


def crops_of(volumes, spec, per_image, seed):
    """The distillation windows: per volume, the window of each structure (as the engine places it on
    the structure), the task's label-centred window and per_image - 1 windows at random points."""
    crops = []
    for image_id, image_path, image, label in volumes:
        crops += [Crop(f"{image_id}: structure {v}", image_path, structure_window(image, label == v, spec))
                  for v in np.unique(label[label != 0])]
        crops += image_crops(image_id, image_path, image, label, per_image, spec, seed)
    return crops


# ---- models and their files ------------------------------------------------------------------------------------
def save_model(spec, checkpoint, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def clicks_to_dice(spec, path, pairs, max_clicks, images):
    engine = spec.engine(spec, path, images=images, weights="official")
    started = time.perf_counter()
    result = evaluate(engine, pairs, max_clicks)
    return {**result["mean"], "structures": len(result["structures"]), "seconds": round(time.perf_counter() - started, 1),
            "per_structure": result["structures"]}


def run(args, folder):
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    teacher_spec, student_spec = small_spec("sam_med3d"), small_spec("fastsam3d")
    images = ImageCache()
    times, report = {}, {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                         "window": WINDOW, "torch_threads": torch.get_num_threads()}

    started = time.perf_counter()
    train_pairs = write_volumes(folder / "train", args.train_volumes, TRAIN_SEEDS + 100 * args.seed, TRAIN_GEOMETRY)
    test_pairs = write_volumes(folder / "test", args.test_volumes, TEST_SEEDS + 100 * args.seed, TEST_GEOMETRY)
    train_volumes, test_volumes = structures(images, train_pairs), structures(images, test_pairs)
    times["data_s"] = time.perf_counter() - started

    # 1. the teacher: seeded weights, prompt encoder and mask decoder fine-tuned by the click loop
    started = time.perf_counter()
    teacher = teacher_spec.builder()
    teacher.load_state_dict(seeded_state_dict(expected_shapes(teacher_spec), 100 + args.seed))
    examples = [e for image_id, image_path, image, label in train_volumes for v in np.unique(label[label != 0])
                if (e := structure_example(f"{image_id}: {v}", image_path, image, label == v, teacher_spec)) is not None]
    embeddings = WindowEmbeddings(teacher.image_encoder, images.get, teacher_spec.preprocess, device, 2**30)
    settings = ClickTrainingSettings(args.teacher_epochs, args.teacher_iterations, args.teacher_clicks, args.teacher_lr,
                                     seed=args.seed)
    history, optimizer = train_clicks(teacher, examples, embeddings, settings,
                                      lambda h: print(f"  teacher epoch {len(h.losses)}: loss {h.losses[-1]:.3f}, "
                                                      f"last-step Dice {h.dice[-1]:.3f}", file=sys.stderr, flush=True))
    teacher.eval()
    teacher_file = save_model(teacher_spec, official_layout(teacher_spec, teacher, optimizer, {
        "epoch": args.teacher_epochs, "losses": history.losses}), folder / "teacher" / teacher_spec.checkpoint_file)
    times["teacher_training_s"] = time.perf_counter() - started
    report["teacher_training"] = {"examples": len(examples), "losses": history.losses, "last_step_dice": history.dice}

    # 2. the student: a fresh encoder with the teacher's prompt encoder and mask decoder (start=scratch)
    def fresh_student():
        torch.manual_seed(args.seed)
        model = student_spec.builder()
        model.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
        model.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
        return model.eval()

    student = fresh_student()
    files = {"student before distillation": save_model(student_spec, {student_spec.checkpoint_key: student.state_dict()},
                                                       folder / "before" / student_spec.checkpoint_file)}
    pairs = depth_pairs(len(student.image_encoder.blocks), len(teacher.image_encoder.blocks))
    started = time.perf_counter()
    train_crops, test_crops = (TeacherTargets(folder / f"targets_{name}", "teacher", [t for _, t in pairs]).prepare(
        crops_of(volumes, student_spec, args.crops_per_image, args.seed), images.get, student_spec.preprocess,
        lambda: teacher.image_encoder, device) for name, volumes in (("train", train_volumes), ("test", test_volumes)))
    times["teacher_targets_s"] = time.perf_counter() - started
    neck = {"student before distillation": {"train": mean_neck_mse(student.image_encoder, train_crops, device),
                                            "test": mean_neck_mse(student.image_encoder, test_crops, device)}}
    report["distillation"] = {"train_windows": len(train_crops), "test_windows": len(test_crops),
                              "depth_pairs": [list(p) for p in pairs], "neck_mse": neck}
    variants = [("student after distillation", 0)] + ([("student after, layer-wise", args.layerwise)] if args.layerwise else [])
    for name, progressive in variants:
        student = fresh_student()
        started = time.perf_counter()
        history, optimizer = distill(student.image_encoder, train_crops, pairs, DistillationSettings(
            args.distill_epochs, progressive_epochs=progressive, seed=args.seed))
        times[f"distillation{'_layerwise' if progressive else ''}_s"] = time.perf_counter() - started
        student.eval()
        neck[name] = {"train": mean_neck_mse(student.image_encoder, train_crops, device),
                      "test": mean_neck_mse(student.image_encoder, test_crops, device)}
        files[name] = save_model(student_spec, distilled_checkpoint(
            student_spec, student, optimizer, history, [c.crop.name for c in train_crops], "scratch", teacher_file.name),
            folder / name.replace(" ", "_").replace(",", "") / student_spec.checkpoint_file)
        report["distillation"][name] = {"progressive_epochs": progressive, "neck_mse_per_epoch": history.neck_mse,
                                        "loss_per_epoch": history.losses, "depth_levels": history.depth_levels}

    # 3. clicks-to-Dice through the engine
    rows = {}
    runs = [("teacher, training volumes", teacher_spec, teacher_file, train_pairs), ("teacher", teacher_spec, teacher_file, test_pairs)]
    for name, path in files.items():
        runs.append((name, student_spec, path, test_pairs))
    for name, spec, path, data in runs:
        rows[name] = clicks_to_dice(spec, path, data, args.max_clicks, images)
        rows[name]["neck_mse"] = neck.get(name, {}).get("test", 0.0 if name == "teacher" else None)
        print(f"  {name}: {rows[name]['seconds']} s", file=sys.stderr, flush=True)
    report.update(clicks_to_dice=rows, seconds={k: round(v, 1) for k, v in times.items()})
    return report


def table(report):
    rows = report["clicks_to_dice"]
    metrics = [k for k in next(iter(rows.values())) if k.startswith(("dice@", "noc@"))]
    teacher = [r["dice@3"] for r in rows["teacher"]["per_structure"]]
    lines = ["| model | volumes (structures) | " + " | ".join(metrics) + " | dice@3 - teacher's, paired (mean ± s.e.) "
             "| neck MSE vs teacher | eval (s) |", "|---|---|" + "---|" * (len(metrics) + 3)]
    for name, row in rows.items():
        volumes = "training" if "training" in name else "held-out"
        mse = "" if row["neck_mse"] is None else f"{row['neck_mse']:.4f}"
        paired = ""
        if name.startswith("student"):  # the same held-out structures as the teacher's row
            differences = np.array([r["dice@3"] for r in row["per_structure"]]) - teacher
            paired = f"{differences.mean():+.3f} ± {differences.std(ddof=1) / np.sqrt(len(differences)):.3f}"
        lines.append(f"| {name.removesuffix(', training volumes')} | {volumes} ({row['structures']}) | "
                     + " | ".join(f"{row[m]:.3f}" if m.startswith("dice") else f"{row[m]:.2f}" for m in metrics)
                     + f" | {paired} | {mse} | {row['seconds']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-volumes", type=int, default=16)
    parser.add_argument("--test-volumes", type=int, default=8)
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--teacher-iterations", type=int, default=60, help="click-loop iterations per epoch")
    parser.add_argument("--teacher-clicks", type=int, default=11, help="steps of the training click loop (upstream 11)")
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--crops-per-image", type=int, default=3, help="distillation windows per volume besides one per structure")
    parser.add_argument("--distill-epochs", type=int, default=60, help="passes over the training windows")
    parser.add_argument("--layerwise", type=int, default=10, metavar="E",
                        help="also distil a second student with the layer-wise option, one more block pair every E epochs (0: not)")
    parser.add_argument("--max-clicks", type=int, default=MAX_CLICKS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        report = run(args, Path(folder))
    report["seconds"]["total_s"] = round(time.perf_counter() - started, 1)
    print(f"# bench_teacher_student: torch {torch.__version__}, {torch.get_num_threads()} threads, {WINDOW}^3 window, "
          f"{args.train_volumes} training / {args.test_volumes} held-out volumes, max {args.max_clicks} clicks\n")
    print(table(report))
    distillation = report["distillation"]
    print(f"\nneck MSE against the teacher, on {distillation['train_windows']} training / {distillation['test_windows']} "
          "held-out windows: " + "; ".join(f"{name}: {mse['train']:.4f} / {mse['test']:.4f}"
                                          for name, mse in distillation["neck_mse"].items()))
    print("wall times (s): " + ", ".join(f"{k[:-2]} {v}" for k, v in report["seconds"].items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
