"""Write the sample studies into a folder, offline and deterministically.

    python scripts/sample_studies.py [OUT_DIR] [--force]

Files written (existing ones are kept unless --force):

* ``mni152_t1.nii.gz``: a real T1 MRI, the MNI152 (ICBM 2009a, 1 mm) template that the
  nilearn wheel ships in ``nilearn/datasets/data`` (nothing is downloaded).
* ``ct_synthetic.nii.gz``: a CT-like volume (HU, int16) with known structures in a
  non-trivial geometry: voxel axes L, P, S, rotated 15 degrees about R and 12 degrees
  about A (oblique), spacing 0.8 x 0.8 x 2.5 mm, 171 x 143 x 57 voxels. Air (-1000 HU)
  outside an elliptic body cylinder (40 HU) that holds a bright ellipsoid (200 HU) and a
  dark one (-100 HU). The structures are defined in world (RAS) millimetres;
  ``ct_label_array()`` gives their ground-truth label map (1 = bright, 2 = dark).

``write_ct_dicom(folder)`` writes the same phantom as a DICOM CT series (for a DICOMweb
store) in the same oblique orientation, on a coarser grid (``DICOM_CT``: 1.3 x 1.5 x 3.5 mm)
so that it is larger than the 3D models' 192 mm window along every axis.
"""

import argparse
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np

MRI_NAME = "mni152_t1.nii.gz"
CT_NAME = "ct_synthetic.nii.gz"

# nilearn ships this file inside its wheel (nilearn/datasets/data).
MNI152_RESOURCE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"

# ---- synthetic CT geometry ------------------------------------------------------------
CT_SHAPE = (171, 143, 57)  # voxels along i, j, k
CT_SPACING = (0.8, 0.8, 2.5)  # mm along i, j, k
CT_ROTATION_DEG = (15.0, 12.0)  # about the world R axis, then about the world A axis
CT_ORIGIN_RAS = (62.0, 48.0, -75.0)  # world (RAS, mm) position of voxel (0, 0, 0)
CT_SEED = 20240611


@dataclass(frozen=True)
class Grid:
    shape: tuple  # voxels along i, j, k
    spacing: tuple  # mm along i, j, k


NIFTI_CT = Grid(CT_SHAPE, CT_SPACING)
# The DICOM series: same centre and axes, wider than 192 mm along i, j and k.
DICOM_CT = Grid((171, 143, 57), (1.3, 1.5, 3.5))

AIR_HU, BODY_HU, NOISE_HU = -1000, 40, 8.0
# Body: elliptic cylinder along world S through the volume centre; semi-axes in mm (R, A).
BODY_SEMI_AXES_MM = (55.0, 42.0)
# Structures: name -> (label value, HU, centre offset from the volume centre in RAS mm,
# semi-axes in mm along R, A, S).
CT_STRUCTURES = {
    "bright": (1, 200, (-20.0, 10.0, 15.0), (14.0, 10.0, 20.0)),
    "dark": (2, -100, (22.0, -8.0, -20.0), (12.0, 12.0, 16.0)),
}


def _rot_x(deg):
    a = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def _rot_y(deg):
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def ct_direction_ras() -> np.ndarray:
    """Unit direction of the i, j, k voxel axes in RAS (columns): L, P, S, then rotated."""
    lps_axes = np.diag([-1.0, -1.0, 1.0])
    return _rot_y(CT_ROTATION_DEG[1]) @ _rot_x(CT_ROTATION_DEG[0]) @ lps_axes


def ct_affine(grid: Grid = NIFTI_CT) -> np.ndarray:
    """The voxel-to-RAS affine of the synthetic CT, as stored in the NIfTI header. Every grid
    has the same axes and the same centre (that of the NIfTI grid)."""
    affine = np.eye(4)
    affine[:3, :3] = ct_direction_ras() @ np.diag(grid.spacing)
    centre_offset = affine[:3, :3] @ ((np.array(grid.shape) - 1) / 2.0)
    affine[:3, 3] = ct_center_ras() - centre_offset
    return affine


def ct_center_ras() -> np.ndarray:
    centre_ijk = (np.array(CT_SHAPE) - 1) / 2.0
    return np.asarray(CT_ORIGIN_RAS) + ct_direction_ras() @ np.diag(CT_SPACING) @ centre_ijk


def _world_grid(grid: Grid) -> np.ndarray:
    """RAS coordinates (mm) of every voxel centre, shape grid.shape + (3,)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1)
    return nib.affines.apply_affine(ct_affine(grid), ijk.reshape(-1, 3)).reshape(tuple(grid.shape) + (3,))


def ct_label_array(grid: Grid = NIFTI_CT) -> np.ndarray:
    """Ground-truth labels of the synthetic CT (uint8, grid.shape): 1 bright, 2 dark."""
    rel = _world_grid(grid) - ct_center_ras()
    labels = np.zeros(grid.shape, dtype=np.uint8)
    for value, _hu, offset, semi in CT_STRUCTURES.values():
        d = (rel - np.asarray(offset)) / np.asarray(semi)
        labels[(d**2).sum(axis=-1) <= 1.0] = value
    return labels


def ct_body_mask(grid: Grid = NIFTI_CT) -> np.ndarray:
    rel = _world_grid(grid) - ct_center_ras()
    a, b = BODY_SEMI_AXES_MM
    return (rel[..., 0] / a) ** 2 + (rel[..., 1] / b) ** 2 <= 1.0


def ct_volume(grid: Grid = NIFTI_CT) -> np.ndarray:
    """The synthetic CT in HU (int16, grid.shape)."""
    hu = np.full(grid.shape, float(AIR_HU))
    body = ct_body_mask(grid)
    hu[body] = BODY_HU
    labels = ct_label_array(grid)
    for value, structure_hu, _offset, _semi in CT_STRUCTURES.values():
        hu[labels == value] = structure_hu
    noise = np.random.default_rng(CT_SEED).normal(0.0, NOISE_HU, grid.shape)
    hu[body] += noise[body]
    return np.round(hu).astype(np.int16)


def _save(img: nib.Nifti1Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(img, tmp)
    os.replace(tmp, path)


def write_ct(path: Path) -> None:
    img = nib.Nifti1Image(ct_volume(), ct_affine())
    img.set_qform(ct_affine(), code=1)
    img.set_sform(ct_affine(), code=1)
    img.header.set_xyzt_units("mm", "sec")
    _save(img, path)


# DICOM identity of the series; UIDs are derived from these names, so every run writes the same.
DICOM_PATIENT_ID = "SAMLABEL-CT-001"
DICOM_STUDY_DESCRIPTION = "Synthetic CT phantom (oblique)"


def write_ct_dicom(folder, grid: Grid = DICOM_CT) -> tuple:
    """The synthetic CT as a DICOM CT series, one file a slice; returns (StudyInstanceUID,
    SeriesInstanceUID). Columns run along i and rows along j; slices are ordered along
    i x j (= +k), as DICOM readers sort them, so every reader sees the array's indices."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uid = lambda *names: generate_uid(entropy_srcs=[DICOM_PATIENT_ID, *map(str, names)])  # noqa: E731
    study_uid, series_uid, frame_uid = uid("study"), uid("series"), uid("frame")
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ct_affine(grid)
    row_direction, column_direction = (affine_lps[:3, a] / grid.spacing[a] for a in (0, 1))
    stored = (ct_volume(grid).astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)
    for k in range(grid.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid("instance", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"ct_{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Synthetic CT", DICOM_PATIENT_ID, "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "SAMLABEL1"
        ds.StudyDescription, ds.SeriesDescription = DICOM_STUDY_DESCRIPTION, "CT oblique 1.3x1.5x3.5 mm"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_direction, *column_direction)]
        ds.ImagePositionPatient = [round(float(v), 6) for v in affine_lps[:3] @ [0, 0, k, 1]]
        ds.PixelSpacing = [grid.spacing[1], grid.spacing[0]]  # between rows (j), between columns (i)
        ds.SliceThickness = ds.SpacingBetweenSlices = grid.spacing[2]
        ds.Rows, ds.Columns = grid.shape[1], grid.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = j, columns = i
        pydicom.dcmwrite(ds.filename, ds, write_like_original=False)
    return study_uid, series_uid


def mni152_path() -> Path:
    return Path(str(resources.files("nilearn") / "datasets" / "data" / MNI152_RESOURCE))


def write_mri(path: Path) -> None:
    src = nib.load(mni152_path())
    img = nib.Nifti1Image(np.asanyarray(src.dataobj), src.affine)
    img.set_qform(src.affine, code=1)
    img.set_sform(src.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    _save(img, path)


def write_sample_studies(out_dir, force: bool = False) -> list:
    """Write the sample studies into out_dir; returns the paths written or kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, writer in ((MRI_NAME, write_mri), (CT_NAME, write_ct)):
        path = out / name
        if force or not path.exists():
            writer(path)
            print(f"wrote {path}")
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="sample-studies")
    parser.add_argument("--force", action="store_true", help="rewrite files that exist")
    args = parser.parse_args(argv)
    write_sample_studies(args.out_dir, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
