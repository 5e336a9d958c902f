"""Reference data of SAM3D's official inference pipeline (nnU-Net v1), for tests/test_autoseg.py.

    python scripts/make_reference_sam3d_preprocess.py --official /path/to/SAM3D [--out FILE]

Runs the OFFICIAL code of a SAM3D checkout (UARK-AICV/SAM3D, sam3d/...) on volumes built here and
writes what it produced to one small npz (default tests/data/reference/sam3d_preprocess.npz):

* preprocessing/preprocessing.py GenericPreprocessor.preprocess_test_case, the path of
  Trainer_*.preprocess_patient: SimpleITK read, crop to the nonzero box, transpose_forward,
  resample_patient to the target spacing, normalisation. Saved: the network input (float32), the
  crop box and shapes it recorded.
* inference/segmentation_export.py save_segmentation_nifti_from_softmax: class probabilities on the
  network grid back to the stored grid (transpose_backward first, as predict.py does), argmax,
  un-crop. Fed `synthetic_softmax` of the network grid; saved: the label map it wrote, in the
  stored (i, j, k) order.
* network_architecture/neural_network.py SegmentationNetwork._compute_steps_for_sliding_window and
  _get_gaussian (static methods), and batchgenerators' pad_nd_image as _internal_predict_3D_3Dconv_tiled
  calls it: window starts for many lengths, Gaussian maps of small patches (and lines of SAM3D's
  Synapse patch, 64 x 176 x 176), padding of small volumes.

Nothing of the official code is copied: it is imported from the checkout given. Run it with the
versions SAM3D's requirements.txt pins, not the project's venv, e.g. (Python 3.8):

    python3.8 -m venv /tmp/sam3d-ref
    /tmp/sam3d-ref/bin/pip install numpy==1.20.1 scipy==1.6.2 scikit-image==0.18.1 SimpleITK==2.2.0 \
        nibabel==4.0.1 batchgenerators==0.21
    /tmp/sam3d-ref/bin/python scripts/make_reference_sam3d_preprocess.py --official /path/to/SAM3D

The versions matter: scikit-image 0.18 resizes 2-D images (the in-plane step of anisotropic
volumes) by its own Catmull-Rom cubic convolution, 0.19 and later through scipy (cubic B-spline);
and batchgenerators 0.25's resize_segmentation no longer takes the `cval` that
resample_data_or_seg passes (a TypeError).
neural_network.py imports torch at module level, which the two static methods run here never use:
where torch is not installed, a stub module stands in for the import.

The cases (built by functions here that the tests import; numpy and nibabel only), each stored
with an oblique affine and small enough to keep the file under 1 MB:

* ``ct_oblique``: CT-like int16, 15 x 44 x 38 voxels of 3.4 x 0.8 x 0.9 mm, the thick axis first in
  the stored order (last in SimpleITK's), so the plans transpose it to the front ([2, 0, 1]); zero
  padding on two faces (the nonzero crop); scheme "CT": resampled in-plane per slice and nearest
  along the thick axis (anisotropy > 3).
* ``mr_masked``: MR-like float32 with a zero background and a zero hole inside the head, stored along
  P, I, L and rotated; scheme "nonCT" with use_mask_for_norm; transpose [1, 0, 2]; all three axes
  resampled by the 3-D cubic B-spline, the nonzero mask linearly.
* ``two_modalities``: a CT (scheme "CT2") and a PET-like float volume (z-score without mask); the
  last network axis keeps its size, so scikit-image resizes it as a 2-D image with channels.
* ``target_anisotropic``: CT with a circular field of view (zero outside) and use_mask_for_norm;
  isotropic enough itself, but the target spacing is anisotropic (> 3), so the separate axis comes
  from the target; transpose [2, 1, 0]. On the way back the official export takes that axis from
  the target spacing in the network's order and applies it in the stored order.
"""

import argparse
import copy
import hashlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_source.py, beside this file
from reference_source import commit_of  # noqa: E402

CLASSES = 3  # of the synthetic softmax
STEP_PATCHES = (8, 16, 34, 64, 160, 176, 192)  # patch lengths whose window starts are recorded
STEP_LENGTHS = 240  # lengths patch .. patch + STEP_LENGTHS - 1
GAUSSIAN_PATCHES = ((6, 20, 17), (7, 32, 16), (1, 5, 4))
SYNAPSE_PATCH = (64, 176, 176)
PAD_SHAPES = (((10, 150, 200), (64, 176, 176)), ((5, 31, 32), (8, 32, 32)), ((9, 33, 31), (8, 32, 32)))


# ---- geometry -----------------------------------------------------------------------------------
def _rot(axis: str, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


LETTERS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def make_affine(axes: str, spacing, shape, rotation, centre_ras) -> np.ndarray:
    """Stored axis a runs along letter axes[a] (rotated), `spacing` mm apart; the volume's centre at
    centre_ras. Rounded to float32, as a NIfTI header holds it."""
    signed = np.zeros((3, 3))
    for a, letter in enumerate(axes):
        world, sign = LETTERS[letter]
        signed[world, a] = sign
    affine = np.eye(4)
    affine[:3, :3] = rotation @ signed @ np.diag(spacing)
    affine[:3, 3] = np.asarray(centre_ras, float) - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine.astype(np.float32).astype(np.float64)


def ras_grid(shape, affine) -> np.ndarray:
    """(*shape, 3) RAS mm of every voxel, relative to the volume's centre."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    return (ijk - (np.array(shape) - 1) / 2) @ affine[:3, :3].T


def inside_ellipsoid(ras, centre, semi) -> np.ndarray:
    return np.sum(((ras - np.asarray(centre)) / np.asarray(semi)) ** 2, axis=-1) <= 1.0


def plans_dict(target_spacing, patch_size, schemes, use_mask, intensity, transpose_forward) -> dict:
    """nnU-Net v1 plans as the official .model.pkl holds them (the entries the pipeline reads);
    transpose_backward as experiment_planner_baseline_3DUNet computes it."""
    backward = [int(np.argwhere(np.array(transpose_forward) == i)[0][0]) for i in range(3)]
    return {
        "num_stages": 1, "num_modalities": len(schemes), "num_classes": CLASSES - 1,
        "normalization_schemes": dict(enumerate(schemes)), "use_mask_for_norm": dict(enumerate(use_mask)),
        "dataset_properties": {"intensityproperties": {m: dict(p) for m, p in enumerate(intensity)}},
        "transpose_forward": list(transpose_forward), "transpose_backward": backward,
        "plans_per_stage": {0: {"current_spacing": np.array(target_spacing, float),
                                "patch_size": np.array(patch_size)}},
    }


CT_STATS = {"mean": 55.5, "sd": 140.25, "percentile_00_5": -980.0, "percentile_99_5": 850.5}
PET_STATS = {"mean": 3.0, "sd": 2.0, "percentile_00_5": 0.0, "percentile_99_5": 12.0}  # unused by z-score


# ---- the volumes ----------------------------------------------------------------------------------
def ct_oblique():
    shape, spacing = (15, 44, 38), (3.4, 0.8, 0.9)
    affine = make_affine("SLA", spacing, shape, _rot("z", 8) @ _rot("y", -12) @ _rot("x", 20), (3.0, -5.0, 11.0))
    ras = ras_grid(shape, affine)
    hu = np.full(shape, -1000.0)
    body = (ras[..., 0] / 15.0) ** 2 + (ras[..., 1] / 12.0) ** 2 <= 1.0  # along S, cut by the R faces
    hu[body] = 40.0 + 0.5 * ras[..., 2][body]
    hu[inside_ellipsoid(ras, (-4.0, 2.0, 5.0), (6.0, 5.0, 10.0))] = 300.0
    shell = np.sum(((ras - (5.0, -3.0, -8.0)) / (5.0, 4.5, 9.0)) ** 2, axis=-1)
    hu[(shell <= 1.0) & (shell >= 0.6)] = 900.0
    noise = np.random.default_rng(11).normal(0.0, 15.0, shape)
    hu[body] += noise[body]
    hu[:, :3, :] = 0.0  # the scanner's padding: cropped away
    hu[:, :, -2:] = 0.0
    plans = plans_dict((2.6, 1.3, 1.15), (8, 32, 32), ["CT"], [False], [CT_STATS], (2, 0, 1))
    return [np.round(hu).astype(np.int16)], affine, plans


def mr_masked():
    shape, spacing = (27, 33, 24), (1.1, 1.4, 1.0)
    affine = make_affine("PIL", spacing, shape, _rot("x", -14) @ _rot("z", 22), (-6.0, 14.0, 30.0))
    ras = ras_grid(shape, affine)
    head = inside_ellipsoid(ras, (0.0, 0.0, 0.0), (14.0, 13.0, 17.0))
    value = np.zeros(shape)
    value[head] = 420.0 + 6.0 * ras[..., 1][head] - 3.0 * ras[..., 2][head]
    value[inside_ellipsoid(ras, (2.0, -1.0, 3.0), (5.0, 4.0, 6.0))] = 130.0  # ventricle
    noise = np.random.default_rng(12).normal(0.0, 20.0, shape)
    value[head] += noise[head]
    value[inside_ellipsoid(ras, (-5.0, 4.0, -6.0), (3.0, 3.0, 3.0))] = 0.0  # a hole: filled by the nonzero mask
    plans = plans_dict((1.25, 1.3, 0.95), (16, 32, 32), ["nonCT"], [True], [{}], (1, 0, 2))
    return [value.astype(np.float32)], affine, plans


def two_modalities():
    shape, spacing = (30, 26, 18), (0.9, 1.2, 2.0)
    affine = make_affine("LPS", spacing, shape, _rot("y", 16) @ _rot("x", -9), (20.0, 8.0, -40.0))
    ras = ras_grid(shape, affine)
    body = (ras[..., 0] / 12.0) ** 2 + (ras[..., 1] / 10.0) ** 2 <= 1.0
    hu = np.full(shape, -1000.0)
    hu[body] = 20.0 - 0.8 * ras[..., 2][body]
    lesion = inside_ellipsoid(ras, (3.0, -2.0, 4.0), (5.0, 4.0, 8.0))
    hu[lesion] = 180.0
    hu += np.random.default_rng(13).normal(0.0, 10.0, shape) * body
    pet = np.where(body, 1.5, 0.2) + 8.0 * lesion + np.random.default_rng(14).gamma(2.0, 0.2, shape)
    hu[:2], pet[:2] = 0.0, 0.0  # both modalities empty there: cropped
    plans = plans_dict((2.5, 1.0, 0.9), (8, 32, 32), ["CT2", "nonCT"], [False, False], [CT_STATS, PET_STATS],
                       (0, 1, 2))
    return [np.round(hu).astype(np.int16), pet.astype(np.float32)], affine, plans


def target_anisotropic():
    shape, spacing = (22, 25, 16), (1.0, 1.0, 2.0)
    affine = make_affine("RAS", spacing, shape, _rot("z", -18) @ _rot("y", 7), (0.0, 0.0, 0.0))
    ras = ras_grid(shape, affine)
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    field_of_view = (ijk[..., 0] - 11.5) ** 2 + (ijk[..., 1] - 13.0) ** 2 <= 10.5 ** 2  # round, in the stored plane
    hu = np.where(inside_ellipsoid(ras, (0.0, 0.0, 0.0), (9.0, 8.0, 30.0)), 60.0 + 1.5 * ras[..., 2], -1000.0)
    hu[inside_ellipsoid(ras, (2.0, 1.0, -3.0), (4.0, 3.0, 7.0))] = 900.0
    hu += np.random.default_rng(15).normal(0.0, 12.0, shape)
    hu[~field_of_view] = 0.0
    plans = plans_dict((1.1, 1.2, 3.9), (8, 16, 16), ["CT"], [True], [CT_STATS], (2, 1, 0))
    return [np.round(hu).astype(np.int16)], affine, plans


CASES = {f.__name__: f for f in (ct_oblique, mr_masked, two_modalities, target_anisotropic)}


def cases() -> dict:
    """name -> (modalities: list of stored (i, j, k) arrays, affine, plans dict)."""
    return {name: build() for name, build in CASES.items()}


def volume_sha256(volumes) -> str:
    digest = hashlib.sha256()
    for volume in volumes:
        digest.update(np.ascontiguousarray(volume).tobytes() + str(volume.dtype).encode())
    return digest.hexdigest()


def synthetic_softmax(shape) -> np.ndarray:
    """(CLASSES, *shape) float32 class probabilities on a network grid with smooth borders, made of
    +, -, * and / only (exactly rounded: every numpy computes the same bits)."""
    u, v, w = np.meshgrid(*[(np.arange(n) + 0.5) / n for n in shape], indexing="ij")
    du, dv, dw = (u - 0.45) / 0.35, (v - 0.5) / 0.3, (w - 0.55) / 0.4
    blob = np.maximum(1.0 - du * du - dv * dv - dw * dw, 0.0)
    ramp = np.maximum(u + 0.6 * v - 0.9 * w - 0.2, 0.0)
    scores = np.stack([np.full(shape, 0.3), 0.05 + 3.0 * blob * blob, 0.05 + 4.0 * ramp * ramp])
    return (scores / scores.sum(axis=0)).astype(np.float32)


# ---- the official run -----------------------------------------------------------------------------
def _stub_torch() -> None:
    """neural_network.py imports torch, torch.nn and torch.cuda.amp at module level; the static
    methods run here use none of them."""
    try:
        import torch
        return
    except ImportError:
        pass
    torch = types.ModuleType("torch")
    torch.tensor = torch.Tensor = type("Tensor", (), {})  # used in annotations only
    nn = types.ModuleType("torch.nn")
    nn.Module = nn.DataParallel = nn.Conv2d = nn.Conv3d = object
    cuda, amp = types.ModuleType("torch.cuda"), types.ModuleType("torch.cuda.amp")
    amp.autocast = object
    torch.nn, torch.cuda, cuda.amp = nn, cuda, amp
    sys.modules.update({"torch": torch, "torch.nn": nn, "torch.cuda": cuda, "torch.cuda.amp": amp})


def run_case(name, volumes, affine, plans, folder: Path) -> dict:
    import SimpleITK as sitk
    from sam3d.inference.segmentation_export import save_segmentation_nifti_from_softmax
    from sam3d.preprocessing.preprocessing import GenericPreprocessor

    files = []
    for m, volume in enumerate(volumes):
        image = nib.Nifti1Image(volume, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        files.append(str(folder / f"{name}_{m:04d}.nii.gz"))
        nib.save(image, files[-1])

    stage = plans["plans_per_stage"][0]
    preprocessor = GenericPreprocessor(plans["normalization_schemes"], plans["use_mask_for_norm"],
                                       plans["transpose_forward"], plans["dataset_properties"]["intensityproperties"])
    data, _, properties = preprocessor.preprocess_test_case(files, copy.deepcopy(stage["current_spacing"]))

    softmax = synthetic_softmax(data.shape[1:])
    exported = str(folder / f"{name}_labels.nii.gz")
    backward = plans["transpose_backward"]
    save_segmentation_nifti_from_softmax(softmax.transpose([0] + [i + 1 for i in backward]), exported,
                                         copy.deepcopy(properties), 1, None, None, None, None, None, None, 0)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(exported)).transpose(2, 1, 0)  # SimpleITK's (z, y, x) -> (i, j, k)
    assert labels.shape == volumes[0].shape

    return {
        "volume_sha256": np.array(volume_sha256(volumes)), "affine": affine,
        "data": data.astype(np.float32), "crop_bbox": np.array(properties["crop_bbox"]),
        "size_after_cropping": np.array(properties["size_after_cropping"]),
        "original_spacing": np.array(properties["original_spacing"], float),
        "softmax_sha256": np.array(hashlib.sha256(softmax.tobytes()).hexdigest()),
        "labels": labels.astype(np.uint8),
    }


def run_window_functions() -> dict:
    """The official window starts, Gaussian maps and padding."""
    _stub_torch()
    from batchgenerators.augmentations.utils import pad_nd_image
    from sam3d.network_architecture.neural_network import SegmentationNetwork

    pairs, starts, counts = [], [], []
    for patch in STEP_PATCHES:
        lengths = list(range(patch, patch + STEP_LENGTHS))
        for i in range(0, len(lengths), 3):  # three lengths per call: one per axis
            group = (lengths[i:i + 3] + [patch] * 3)[:3]
            steps = SegmentationNetwork._compute_steps_for_sliding_window((patch,) * 3, group, 0.5)
            for length, axis_steps in zip(group, steps):
                pairs.append((length, patch))
                starts.extend(axis_steps)
                counts.append(len(axis_steps))
    out = {"step_pairs": np.array(pairs), "step_starts": np.array(starts), "step_counts": np.array(counts)}
    for i, patch in enumerate(GAUSSIAN_PATCHES):
        out[f"gaussian_{i}"] = SegmentationNetwork._get_gaussian(patch, sigma_scale=1. / 8)
    synapse = SegmentationNetwork._get_gaussian(SYNAPSE_PATCH, sigma_scale=1. / 8)
    centre = [n // 2 for n in SYNAPSE_PATCH]
    out["synapse_gaussian_lines"] = np.stack([synapse[:, centre[1], centre[2]][:64],
                                              synapse[centre[0], :, centre[2]][:64],
                                              synapse[centre[0], centre[1], :][:64]])
    out["synapse_gaussian_corner"] = synapse[0, 0, 0]
    out["synapse_gaussian_far_corner"] = synapse[-1, -1, -1]
    slicers, padded_shapes = [], []
    for shape, patch in PAD_SHAPES:
        padded, slicer = pad_nd_image(np.zeros((1, *shape), np.float32), patch, "constant", {"constant_values": 0},
                                      True, None)
        slicers.append([[s.start, s.stop] for s in slicer[1:]])
        padded_shapes.append(padded.shape[1:])
    out["pad_slicers"], out["padded_shapes"] = np.array(slicers), np.array(padded_shapes)
    return out


def provenance(official: Path) -> dict:
    import batchgenerators
    import scipy
    import SimpleITK
    import skimage

    commit = commit_of(official)
    version = getattr(batchgenerators, "__version__", None)
    if version is None:
        from importlib.metadata import version as package_version
        version = package_version("batchgenerators")
    return {"official_commit": np.array(commit), "numpy": np.array(np.__version__),
            "scipy": np.array(scipy.__version__),
            "skimage": np.array(skimage.__version__), "batchgenerators": np.array(version),
            "simpleitk": np.array(SimpleITK.Version_VersionString())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="a SAM3D checkout (UARK-AICV/SAM3D)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "reference"
                                             / "sam3d_preprocess.npz"))
    args = parser.parse_args(argv)
    official = Path(args.official).resolve()
    if not (official / "sam3d" / "preprocessing" / "preprocessing.py").is_file():
        parser.error(f"{official} has no sam3d/preprocessing/preprocessing.py: not a SAM3D checkout")
    sys.path.insert(0, str(official))
    out = {**provenance(official), **run_window_functions()}
    with tempfile.TemporaryDirectory() as folder:
        for name, (volumes, affine, plans) in cases().items():
            for key, value in run_case(name, volumes, affine, plans, Path(folder)).items():
                out[f"{name}__{key}"] = value
            out[f"{name}__plans"] = np.array(json.dumps(plans, default=lambda a: np.asarray(a).tolist()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"{args.out}: {os.path.getsize(args.out) / 1024:.0f} KiB; "
          + ", ".join(f"{name} {tuple(out[f'{name}__data'].shape)}" for name in CASES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
