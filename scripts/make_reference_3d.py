"""Reference data of the official SAM-Med3D input pipeline, for tests/test_official_3d_pipeline.py.

    python scripts/make_reference_3d.py --official /path/to/SAM-Med3D [--out tests/data/reference] [--mni FILE]

Runs the OFFICIAL preprocessing and postprocessing of a SAM-Med3D checkout (its
utils/infer_utils.py: `get_subject_and_meta_info`, `data_preprocess`, `data_postprocess`; TorchIO
Resample to 1.5 mm, ToCanonical, CropOrPad(mask_name="label") to 128^3, ZNormalization over
x > 0, and back with nearest-neighbour Resample) on test volumes built here, and writes what it
produced, compactly, to `<out>/official3d_<case>.npz`. Nothing of the official code is copied:
it is imported from the checkout given.

Run it with an interpreter that has what the official code imports (not the project's venv;
tests/data/README.md gives the exact commands): torch, torchio 0.20.10 (SAM-Med3D's inference
code calls CropOrPad._compute_center_crop_or_pad(subject), which torchio >= 1.2 no longer
accepts), SimpleITK, nibabel, numpy, edt. The MNI152 file comes from nilearn's wheel when nilearn
imports, else from --mni.

The volumes (built by functions here that the tests import, numpy and nibabel only):

* ``ct_oblique``: a CT-like int16 volume, 301 x 257 x 61 voxels of 0.6 x 0.9 x 3.0 mm, stored
  along L, A, S (a left-handed index frame), rotated obliquely; the body is cut by the i faces.
  Target inside the body.
* ``ct_oblique_border``: the same volume, target near a corner: about 80 % of the window lies
  outside the image.
* ``mni_permuted``: the MNI152 T1 (uint8, 1 mm) stored with permuted and flipped axes.

Per case the file holds: the stored geometry and a sha256 of the volume (the tests rebuild it and
check), the target and label radius, the official grids (resampled canonical affine and shape,
the 128^3 crop's affine, the label's bounding box on the canonical grid), the official crop
before normalisation on its six faces and three interior planes (in the dtype the official
pipeline resamples into: the image's own), the normalisation's mean and std, the official
normalised input at 4096 random voxels, and the official mask back on the stored grid for the
low-res logits of `low_res_logits()` (packed bits of its bounding block).
"""

import argparse
import copy
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_source.py, beside this file
from reference_source import commit_of  # noqa: E402

SIZE = 128
SPACING = 1.5
LOW = 32
PLANES = ((0, 40), (1, 64), (2, 90))  # interior planes stored: (axis, index)
SAMPLES = 4096  # random voxels of the normalised crop stored as they are

# ---- the oblique, left-handed, anisotropic CT-like volume ---------------------------------
CT_SHAPE = (301, 257, 61)
CT_SPACING = (0.6, 0.9, 3.0)
CT_SEED = 20261128


def _rot(axis: str, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def ct_affine() -> np.ndarray:
    """Voxel axes L, A, S (determinant -1), rotated 17 degrees about R, -11 about A, 9 about S."""
    directions = _rot("z", 9.0) @ _rot("y", -11.0) @ _rot("x", 17.0) @ np.diag([-1.0, 1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = directions @ np.diag(CT_SPACING)
    affine[:3, 3] = np.array([4.0, -7.0, 12.0]) - affine[:3, :3] @ ((np.array(CT_SHAPE) - 1) / 2)  # centre
    return affine


def ct_centre() -> np.ndarray:
    return nib.affines.apply_affine(ct_affine(), (np.array(CT_SHAPE) - 1) / 2)


def ct_volume() -> np.ndarray:
    """HU, int16: air -1000; an elliptic body cylinder (semi-axes 105 x 80 mm, along S, wider than
    the image along i) at 30 HU with a ramp of 0.4 HU/mm along S; a bright ellipsoid (260 HU),
    a bone shell (800 HU) and a dark one (-90 HU); Gaussian noise (sigma 12 HU) in the body."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in CT_SHAPE], indexing="ij"), axis=-1)
    rel = (ijk - (np.array(CT_SHAPE) - 1) / 2) @ ct_affine()[:3, :3].T  # RAS mm from the volume centre
    body = (rel[..., 0] / 105.0) ** 2 + (rel[..., 1] / 80.0) ** 2 <= 1.0
    hu = np.full(CT_SHAPE, -1000.0)
    hu[body] = 30.0 + 0.4 * rel[..., 2][body]
    def ellipsoid(centre, semi):  # noqa: E306
        return np.sum(((rel - centre) / semi) ** 2, axis=-1)
    hu[ellipsoid((-25.0, 12.0, 18.0), (16.0, 11.0, 24.0)) <= 1] = 260.0
    shell = ellipsoid((30.0, -20.0, -10.0), (20.0, 18.0, 30.0))
    hu[(shell <= 1) & (shell >= 0.7)] = 800.0
    hu[ellipsoid((22.0, 25.0, -30.0), (12.0, 12.0, 18.0)) <= 1] = -90.0
    noise = np.random.default_rng(CT_SEED).normal(0.0, 12.0, CT_SHAPE)
    hu[body] += noise[body]
    return np.round(hu).astype(np.int16)


# ---- the MNI152 T1, stored permuted and flipped --------------------------------------------
MNI_PERMUTATION = (2, 0, 1)  # stored axis a holds the template's axis MNI_PERMUTATION[a]
MNI_FLIPS = (True, False, True)  # stored axes run backwards


def mni152_file(override=None) -> Path:
    if override:
        return Path(override)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sample_studies  # the nilearn wheel's file, as the sample studies use it

    return sample_studies.mni152_path()


def mni_permuted(path) -> tuple:
    """(volume, affine): the template's voxels (uint8) permuted and flipped, with the affine that
    keeps every voxel at its RAS point."""
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    stored = np.transpose(data, MNI_PERMUTATION)
    t = np.zeros((4, 4))
    t[3, 3] = 1
    for a, (source, flip) in enumerate(zip(MNI_PERMUTATION, MNI_FLIPS)):  # stored index -> template index
        if flip:
            stored = np.flip(stored, axis=a)
            t[source, a], t[source, 3] = -1.0, stored.shape[a] - 1
        else:
            t[source, a] = 1.0
    return np.ascontiguousarray(stored), image.affine @ t


# ---- the cases -----------------------------------------------------------------------------
def cases(mni=None) -> dict:
    """name -> (volume, affine, target: RAS mm, label radius mm)."""
    ct, ct_aff = ct_volume(), ct_affine().astype(np.float32).astype(np.float64)  # as a NIfTI header holds it
    mri, mri_aff = mni_permuted(mni152_file(mni))
    corner = nib.affines.apply_affine(ct_aff, (297, 210, 2))
    return {
        "ct_oblique": (ct, ct_aff, ct_centre() + [12.0, -9.0, 10.0], 6.0),
        "ct_oblique_border": (ct, ct_aff, corner, 5.0),
        "mni_permuted": (mri, mri_aff, np.array([21.0, -17.0, 13.0]), 6.0),
    }


def volume_sha256(volume: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(volume).tobytes() + str(volume.dtype).encode()).hexdigest()


def label_ball(shape, affine, target_ras, radius_mm) -> np.ndarray:
    """uint8 label: the stored voxels within radius_mm of the target (the official crop's target)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (np.sum((ras - target_ras) ** 2, axis=-1) <= radius_mm ** 2).astype(np.uint8)


def low_res_logits() -> np.ndarray:
    """Deterministic low-res logits (1, 1, 32, 32, 32) of a wavy ellipsoid, off the window centre:
    what a model might return; used to compare the two ways back to the image (D3)."""
    g = np.stack(np.meshgrid(*[np.arange(LOW, dtype=np.float64)] * 3, indexing="ij"), axis=-1)
    r = np.sqrt(np.sum(((g - [15.3, 16.8, 14.1]) / [9.5, 7.0, 11.0]) ** 2, axis=-1))
    wave = 0.6 * np.sin(0.9 * g[..., 0]) * np.cos(0.7 * g[..., 1]) + 0.3 * np.sin(0.5 * g[..., 2] + 1.0)
    return (4.0 * (1.0 - r) + wave).astype(np.float32)[None, None]


def rim_and_planes(volume: np.ndarray) -> dict:
    """The six faces and PLANES of a (SIZE,)*3 array, by name."""
    out = {}
    for axis in range(3):
        for index in (0, SIZE - 1):
            out[f"face_{axis}_{index}"] = np.take(volume, index, axis=axis)
    for axis, index in PLANES:
        out[f"plane_{axis}_{index}"] = np.take(volume, index, axis=axis)
    return out


# ---- the official run ----------------------------------------------------------------------
def run_case(official, name, volume, affine, target_ras, radius_mm, folder: Path) -> dict:
    import torch
    import torch.nn.functional as F
    import torchio as tio

    sys.path.insert(0, str(official))
    from utils.infer_utils import data_postprocess, data_preprocess, get_subject_and_meta_info

    image_path, label_path = folder / f"{name}.nii.gz", folder / f"{name}_label.nii.gz"
    for data, path in ((volume, image_path), (label_ball(volume.shape, affine, target_ras, radius_mm), label_path)):
        image = nib.Nifti1Image(data, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, str(path))

    subject, meta = get_subject_and_meta_info(str(image_path), str(label_path))
    # The official input, as validate_paired_img_gt makes it (category 1, 1.5 mm, 128^3).
    roi_image, roi_label, meta = data_preprocess(copy.deepcopy(subject), copy.deepcopy(meta), category_index=1,
                                                 target_spacing=(SPACING,) * 3, crop_size=SIZE)
    official = roi_image[0, 0].numpy()
    # The same official transforms without the normalisation: the crop as resampled.
    raw_subject = tio.Compose([tio.Resample(target=(SPACING,) * 3), tio.ToCanonical(),
                               tio.CropOrPad(mask_name="label", target_shape=(SIZE,) * 3)])(copy.deepcopy(subject))
    raw = raw_subject.image.data[0]
    assert np.allclose(raw_subject.image.affine, meta["roi_subject_affine"], atol=1e-9)
    values = raw.float()[raw.float() > 0]
    mean, std = values.mean(), values.std()
    assert torch.equal((raw.float() - mean) / std, torch.from_numpy(official)), "not (raw - mean) / std"

    canonical_affine = np.asarray(meta["canonical_subject_affine"], dtype=np.float64)
    roi_affine = np.asarray(meta["roi_subject_affine"], dtype=np.float64)
    begin = np.round(np.linalg.solve(canonical_affine, roi_affine)[:3, 3]).astype(int)
    in_label = np.argwhere(roi_label[0, 0].numpy() > 0)
    bbox = np.stack([in_label.min(0), in_label.max(0)]) + begin  # inclusive, canonical grid indices

    logits = low_res_logits()
    high = F.interpolate(torch.from_numpy(logits), size=(SIZE,) * 3, mode="trilinear", align_corners=False)
    prediction = (torch.sigmoid(high) > 0.5).numpy()[0, 0].astype(np.uint8)
    mask = data_postprocess(prediction, copy.deepcopy(meta)).transpose(2, 1, 0)  # back to (i, j, k)
    assert mask.shape == volume.shape
    where = np.argwhere(mask)
    low_corner, high_corner = where.min(0), where.max(0) + 1
    block = mask[tuple(slice(a, b) for a, b in zip(low_corner, high_corner))].astype(bool)

    rng = np.random.default_rng(5)
    sample_index = rng.integers(0, SIZE, size=(SAMPLES, 3)).astype(np.uint8)
    out = {
        "name": np.array(name), "volume_shape": np.array(volume.shape), "volume_dtype": np.array(str(volume.dtype)),
        "volume_sha256": np.array(volume_sha256(volume)), "affine": affine,
        "target_ras": np.asarray(target_ras, dtype=np.float64), "label_radius_mm": np.array(radius_mm),
        "canonical_affine": canonical_affine, "canonical_shape": np.array(meta["canonical_subject_shape"]),
        "roi_affine": roi_affine, "label_bbox": bbox,
        "raw_dtype": np.array(str(raw.numpy().dtype)),
        "mean": np.array(mean.item(), np.float32), "std": np.array(std.item(), np.float32),
        "positive_voxels": np.array(int((raw > 0).sum())),
        "sample_index": sample_index, "sample_value": official[tuple(sample_index.T.astype(int))].astype(np.float32),
        "logits_sha256": np.array(hashlib.sha256(logits.tobytes()).hexdigest()),
        "mask_block_start": low_corner, "mask_block_shape": np.array(block.shape),
        "mask_bits": np.packbits(block.reshape(-1)), "mask_voxels": np.array(int(mask.sum())),
    }
    for key, value in rim_and_planes(raw.numpy()).items():
        out[key] = np.ascontiguousarray(value)
    return out


def provenance(official: Path) -> dict:
    import SimpleITK
    import torch
    import torchio

    commit = commit_of(official)
    return {"official_commit": np.array(commit), "torchio": np.array(torchio.__version__),
            "simpleitk": np.array(SimpleITK.Version_VersionString()), "torch": np.array(torch.__version__),
            "numpy": np.array(np.__version__)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="a SAM-Med3D checkout (uni-medical/SAM-Med3D)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "reference"))
    parser.add_argument("--mni", default=None, help="the MNI152 file of nilearn's wheel, when nilearn does not import")
    parser.add_argument("--commit", default=None, help="the official commit, when --official is not a git checkout")
    args = parser.parse_args(argv)
    official = Path(args.official).resolve()
    if not (official / "utils" / "infer_utils.py").is_file():
        parser.error(f"{official} has no utils/infer_utils.py: not a SAM-Med3D checkout")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = provenance(official)
    if args.commit:
        meta["official_commit"] = np.array(args.commit)
    with tempfile.TemporaryDirectory() as folder:
        for name, (volume, affine, target, radius) in cases(args.mni).items():
            data = run_case(official, name, volume, affine, target, radius, Path(folder))
            path = out / f"official3d_{name}.npz"
            np.savez_compressed(path, **data, **meta)
            print(f"{path}: {os.path.getsize(path) / 1024:.0f} KiB; crop {np.round(data['roi_affine'][:3, 3], 3)}, "
                  f"mean {float(data['mean']):.3f}, std {float(data['std']):.3f}, "
                  f"mask {int(data['mask_voxels'])} voxels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
