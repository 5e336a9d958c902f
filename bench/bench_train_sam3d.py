"""SAM3D's train task on the sample studies' synthetic labels, and its iteration times.

    .venv/bin/python bench/bench_train_sam3d.py [--threads 2] [--device cpu] [--epochs 40] [--iterations 25]
        [--studies ct mri] [--full-size-iterations 2] [--full-size-slices 4]

(`--studies` alone: only the full-size timing; `--full-size-iterations 0`: only the training.)

1. Training (a tiny configuration: seeded SAM ViT with embed_dim 32, depth 2, at 64x64; the full
   SAM3D decoder; a fresh decoder): for each study, the train task (samlabel.tasks.train_auto) on a
   LocalDatastore holding the study and its final label, then SAM3D's automatic segmentation
   (autoseg.segment) with the decoder it wrote, scored against the label on the image's own grid.
   - ct: scripts/sample_studies.py's synthetic CT (oblique, 0.8 x 0.8 x 2.5 mm) and its two
     ellipsoids ("bright" 1, "dark" 2); CT plans (the Synapse-like intensity statistics of
     samlabel.seeded), target spacing = the image's.
   - mri: the MNI152 T1 and nilearn's MNI152 brain mask ("brain" 1); z-score ("nonCT") plans, 2 mm.
   Prints the loss and training Dice per epoch (the task's log), the feature cache's size and time
   per volume, the iteration time, and the automatic result's Dice per structure.
2. Iteration time of the full-size configuration: the SAM3D decoder for Synapse (14 classes) on a
   [64, 176, 176] patch, batch 2, through the same training loop on cached features; and SAM
   ViT-B's time per 176x176 slice, i.e. what filling the feature cache costs per slice.
"""

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from samlabel import autoseg
from samlabel.modeling.build_sam3d_seg import build_sam3d_seg
from samlabel.modeling.sam3d_decoder import SAM_FEATURES, Sam3DDecoder
from samlabel.sam3d_training import TrainingSettings, TrainingVolume, train_decoder
from samlabel.sam3d_training_seeded import seeded_sam3d_engine
from samlabel.tasks.train_auto import Sam3DTraining

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import sample_studies  # noqa: E402

TINY_PATCH = (16, 64, 64)
SYNAPSE_PATCH, SYNAPSE_CLASSES, SYNAPSE_BATCH = (64, 176, 176), 14, 2


def ct_study(folder: Path):
    """(image file, label array, label names, target spacing (z, y, x), scheme)."""
    image = folder / sample_studies.CT_NAME
    sample_studies.write_ct(image)
    names = {name: value for name, (value, *_rest) in sample_studies.CT_STRUCTURES.items()}
    spacing = tuple(reversed(sample_studies.CT_SPACING))
    return image, sample_studies.ct_label_array(), names, spacing, "CT"


def mri_study(folder: Path):
    from nilearn.datasets import load_mni152_brain_mask

    image = folder / sample_studies.MRI_NAME
    sample_studies.write_mri(image)
    mask = np.asarray(load_mni152_brain_mask(resolution=1).dataobj) > 0  # the template's own grid
    return image, mask.astype(np.uint8), {"brain": 1}, (2.0, 2.0, 2.0), "nonCT"


STUDIES = {"ct": ct_study, "mri": mri_study}


def dice(result: np.ndarray, truth: np.ndarray, value: int) -> float:
    a, b = result == value, truth == value
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def train_study(name: str, root: Path, args) -> None:
    from monailabel.datastore.local import LocalDatastore

    studies, scratch = root / "studies", root / "scratch"
    studies.mkdir()
    scratch.mkdir()
    image_file, truth, names, spacing, scheme = STUDIES[name](studies)
    label_file = scratch / image_file.name
    nib.save(nib.Nifti1Image(truth, nib.load(image_file).affine), label_file)
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",))
    image_id = image_file.name.split(".")[0]
    store.save_label(image_id, str(label_file), "final", {"label_info": [{"name": n, "idx": v} for n, v in names.items()]})
    engine = seeded_sam3d_engine(root / "model", f"sam3d_{name}", names, TINY_PATCH, spacing, scheme)

    print(f"\n== {name}: {image_file.name} {nib.load(image_file).shape}, labels {names}, plans {scheme} "
          f"at {spacing} mm, patch {TINY_PATCH}, tiny ViT, fresh decoder")
    request = {"max_epochs": args.epochs, "iterations_per_epoch": args.iterations, "learning_rate": args.lr,
               "batch_size": 2, "device": args.device, "start": "fresh", "seed": args.seed}
    result = Sam3DTraining(engine)(request, store)
    for entry in result["feature_cache"]:
        print(f"feature cache: {entry['image']}: {entry['bytes'] / 1e6:.1f} MB, {entry['seconds']:.1f} s "
              f"(preprocessing + encoding)")
    print(f"loss per epoch: {[round(v, 4) for v in result['loss']]}")
    print(f"training Dice per epoch: {[round(v, 4) for v in result['dice']]}")
    print(f"iteration: {result['seconds_per_iteration']:.3f} s (batch 2), training {result['total_time']} s in all, "
          f"wrote {result['written']}")

    model, plans = engine.model()  # the decoder just written
    image = engine.images.get(str(image_file))
    started = time.perf_counter()
    with torch.no_grad():
        labels = autoseg.segment(image.array, image.affine, plans, model.encode, model.decode, device=args.device)
    scores = {n: round(float(dice(labels, truth, v)), 4) for n, v in names.items()}
    print(f"automatic segmentation with it ({time.perf_counter() - started:.1f} s): Dice {scores}")


def full_size_timing(args) -> None:
    device = torch.device(args.device)
    print(f"\n== full size: SAM3D decoder ({SYNAPSE_CLASSES} classes) on {list(SYNAPSE_PATCH)}, batch {SYNAPSE_BATCH}")
    depth, size = SYNAPSE_PATCH[0], SYNAPSE_PATCH[1] // 16
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, depth, SAM_FEATURES, size, size), dtype=np.float32).astype(np.float16)
    labels = np.zeros(SYNAPSE_PATCH, np.uint8)
    labels[10:50, 40:120, 50:130] = 6
    volume = TrainingVolume.build("synthetic", features, [(0, 0)], labels, SYNAPSE_PATCH, rng)
    decoder = Sam3DDecoder(SYNAPSE_CLASSES).to(device)
    settings = TrainingSettings(1, args.full_size_iterations + 1, SYNAPSE_BATCH, 1e-2, 0, str(device), batch_dice=False)
    history, _ = train_decoder(decoder, [volume], SYNAPSE_PATCH, settings)
    print(f"decoder training iteration: {history.seconds[0] / settings.iterations_per_epoch:.2f} s "
          f"(mean of {settings.iterations_per_epoch}, the first included)")

    model = build_sam3d_seg(SYNAPSE_PATCH[1], SYNAPSE_CLASSES).to(device)  # SAM ViT-B, random weights
    slices = torch.zeros((1, 1, args.full_size_slices, *SYNAPSE_PATCH[1:]), device=device)
    model.encode(slices[:, :, :1])  # warm-up
    started = time.perf_counter()
    model.encode(slices)
    per_slice = (time.perf_counter() - started) / args.full_size_slices
    # Synapse-like CT, 512 x 512 x 148 at about the target spacing: 5 x 5 tiles of 176 (step 88), 148 slices
    tiles, slice_bytes = 25, SAM_FEATURES * size * size * 2
    print(f"SAM ViT-B encoder: {per_slice:.2f} s per {SYNAPSE_PATCH[1]}^2 slice; a 512x512x148 CT = {tiles} tiles x 148 "
          f"slices: {tiles * 148 * per_slice / 60:.0f} min to cache, {tiles * 148 * slice_bytes / 1e6:.0f} MB (float16)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--studies", nargs="*", default=list(STUDIES), choices=list(STUDIES))
    parser.add_argument("--full-size-iterations", type=int, default=2, help="0: skip the full-size timing")
    parser.add_argument("--full-size-slices", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("samlabel.tasks.train_auto").setLevel(logging.INFO)  # the per-epoch lines
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads")
    for name in args.studies:
        with tempfile.TemporaryDirectory() as folder:
            train_study(name, Path(folder), args)
    if args.full_size_iterations:
        full_size_timing(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
