"""DICOM on a DICOMweb store: refusing series whose slices are not evenly spaced, and the
metadata of the DICOM SEG that a `final` label becomes.

MONAI Label 0.8.5 converts a downloaded series to NIfTI with SimpleITK, which puts the slices
on a uniform grid of their mean spacing: a series with a missing slice is then silently
misplaced (and so is the SEG made from a mask on that grid). Its SEG template codes every
segment as spleen (SCT 78961009), marks it AUTOMATIC and describes the series as "AIName".
``as_dicom_seg_store`` gives its DICOMweb datastore the check and the metadata below.
"""

import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag

from .errors import InputError

# Misplacement allowed for a slice on the uniform grid, as a fraction of the slice spacing.
SLICE_TOLERANCE = 0.1
# Generic code for a segment whose anatomy is not known: SCT 85756007 "Tissue", as Slicer's
# generic segments, for both category and type (the label name says what it is).
TISSUE = {"CodeValue": "85756007", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Tissue"}
APP_NAME = "samlabel"  # the algorithm named when no model is known for the image (e.g. after a restart)
LO = 64  # DICOM's Long String: label, description, algorithm name


class NonUniformSeriesError(InputError):
    """The series' slices are not evenly spaced along their normal (e.g. one slice missing)."""


def check_uniform_slices(folder) -> None:
    """Raise NonUniformSeriesError unless the DICOM slices in folder lie on one evenly spaced
    stack: same orientation, no two at one position, each within SLICE_TOLERANCE of a spacing
    of the uniform grid that readers put them on. Files without a slice position (e.g. one
    multi-frame instance) and series of fewer than three slices are not checked."""
    import pydicom

    slices = []
    for path in sorted(Path(folder).iterdir()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["ImagePositionPatient", "ImageOrientationPatient"])
        except Exception:  # noqa: BLE001 - not DICOM: left to the reader
            continue
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            slices.append((np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float)))
    if len(slices) < 3:
        return
    name = os.path.basename(os.path.normpath(folder))
    orientation = slices[0][1]
    if any(np.abs(o - orientation).max() > 1e-3 for _, o in slices):
        raise NonUniformSeriesError(f"DICOM series {name}: its slices have different orientations; it cannot be "
                                    "read as one volume")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.sort([p @ normal for p, _ in slices])
    gaps = np.diff(positions)
    spacing = (positions[-1] - positions[0]) / (len(positions) - 1)  # the uniform grid readers use
    if gaps.min() < 1e-3 * max(spacing, 1e-3):
        raise NonUniformSeriesError(f"DICOM series {name}: two slices lie at the same position "
                                    f"({positions[np.argmin(gaps)]:.2f} mm along the slice normal)")
    misplaced = np.abs(positions - (positions[0] + spacing * np.arange(len(positions))))
    if misplaced.max() > SLICE_TOLERANCE * spacing:
        widest = int(np.argmax(gaps))
        raise NonUniformSeriesError(
            f"DICOM series {name}: its {len(positions)} slices are not evenly spaced (a slice missing?): the gap "
            f"between slices {widest + 1} and {widest + 2} is {gaps[widest]:.2f} mm, the median gap "
            f"{np.median(gaps):.2f} mm. On a uniform grid a slice would be misplaced by up to "
            f"{misplaced.max():.2f} mm, so the series is refused")


def label_values(label_file: str) -> List[int]:
    """The non-zero values of a label file, as MONAI Label reads it (OHIF's .bin: raw uint8)."""
    if label_file.endswith(".bin"):
        array = np.fromfile(label_file, dtype=np.uint8)
    else:
        from monai.transforms import LoadImage

        try:
            array = np.asarray(LoadImage(image_only=True)(label_file))
        except Exception as error:  # noqa: BLE001 - readers raise many types; the client needs the message
            raise InputError(f"cannot read the label: {error}") from None
    return [int(v) for v in np.unique(array) if v != 0]


def seg_label_info(values: List[int], client_info: Optional[List[Dict[str, Any]]], model: str) -> List[Dict]:
    """MONAI Label's label_info list for nifti_to_dicom_seg, one entry per label value in the
    mask (it pairs entry i with the i-th value; we pair by the client's "idx" where given),
    each with the full dcmqi segment attributes, so that its defaults are not used."""
    client_info = [i for i in (client_info or []) if isinstance(i, dict)]
    by_idx = {i["idx"]: i for i in client_info if isinstance(i.get("idx"), int)}
    entries = []
    for n, value in enumerate(values):
        given = by_idx.get(value) or (client_info[n] if not by_idx and n < len(client_info) else {})
        name = str(given.get("name") or ("segment" if len(values) == 1 else f"segment {value}"))[:LO]
        rgb = given.get("color")
        if not (isinstance(rgb, (list, tuple)) and len(rgb) >= 3 and all(isinstance(c, (int, float)) for c in rgb[:3])):
            rgb = GENERIC_ANATOMY_COLORS.get(name, (255, 0, 0))
        attributes = {
            "labelID": value,
            "SegmentLabel": name,
            "SegmentDescription": str(given.get("description") or name)[:LO],
            # every model here segments from the user's clicks
            "SegmentAlgorithmType": "SEMIAUTOMATIC",
            "SegmentAlgorithmName": model[:LO],
            "SegmentedPropertyCategoryCodeSequence": dict(TISSUE),
            "SegmentedPropertyTypeCodeSequence": dict(TISSUE),
            "recommendedDisplayRGBValue": [min(max(int(c), 0), 255) for c in rgb[:3]],
        }
        # model_name: MONAI Label's SeriesDescription (its first entry's)
        entries.append({"name": name, "model_name": f"{model} segmentation"[:LO], "segmentAttribute": attributes})
    return entries


def result_label_info(result: Any) -> List[Dict[str, Any]]:
    """Segment names of an infer result saved with save_label: its JSON's `label_names`, the task's
    labels as MONAI Label puts them there (a list for values 1, 2...; or a dict name -> value)."""
    names = result.get("label_names") if isinstance(result, dict) else None
    if isinstance(names, list):
        names = {name: value for value, name in enumerate(names, start=1)}
    if not isinstance(names, dict):
        return []
    return [{"idx": value, "name": str(name)} for name, value in names.items() if isinstance(value, int)]


def as_dicom_seg_store(store):
    """MONAI Label's DICOMweb datastore with the checks and SEG metadata of this module; any
    other datastore unchanged. (The class is swapped rather than the datastore rebuilt: its
    constructor starts a cache watcher and needs the settings MONAI Label resolved.)"""
    if isinstance(store, DICOMWebDatastore) and not isinstance(store, DicomSegStore):
        store.__class__ = DicomSegStore
        store._models_used, store._series_locks, store._lock = {}, {}, threading.Lock()
    return store


class DicomSegStore(DICOMWebDatastore):
    def note_model(self, image_id: str, model: str) -> None:
        """Remember the model that last segmented image_id, for the SEG saved for it."""
        with self._lock:
            self._models_used[image_id] = model

    def get_image_uri(self, image_id: str) -> str:
        # One download and conversion per series at a time: requests now run in parallel threads,
        # and one that found a half-downloaded folder would convert (and cache) a partial series.
        with self._lock:
            lock = self._series_locks.setdefault(image_id, threading.RLock())
        with lock:
            converted = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))
            if not self._convert_to_nifti or not os.path.exists(converted):
                # checked before MONAI Label converts it (a refused series is never converted)
                folder = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
                if not os.path.isdir(folder) or not os.listdir(folder):
                    dicom_web_download_series(None, image_id, folder, self._client, self._fetch_by_frame)
                check_uniform_slices(folder)
            uri = super().get_image_uri(image_id)
            if self._convert_to_nifti and os.path.realpath(uri) != converted and os.path.isfile(converted):
                # MONAI Label answers its first conversion with the temporary file it then copied into the
                # cache (and leaves it behind): every request must see one path, the cached file, or the
                # first click's interaction and image cache belong to a file no later click names.
                os.remove(uri)
                return converted
            return uri

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "") -> str:
        if label_tag == DefaultLabelTag.FINAL:
            self.get_image_uri(image_id)  # the series' check, before anything is converted
            values = label_values(label_filename)
            if not values:
                raise InputError("the label is empty: a DICOM SEG needs at least one labelled voxel")
            with self._lock:
                model = str(label_info.get("model") or self._models_used.get(image_id) or APP_NAME)
            named = label_info.get("label_info") or result_label_info(label_info.get("params"))
            label_info = {**label_info, "label_info": seg_label_info(values, named, model)}
        return super().save_label(image_id, label_filename, label_tag, label_info, label_id)

