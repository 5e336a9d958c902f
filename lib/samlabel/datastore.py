"""A LocalDatastore that keeps every write inside the studies folder and survives a kill mid-write.

MONAI Label's LocalDatastore joins label tags and image ids into paths as given (``../`` or an
absolute tag writes anywhere) and rewrites ``datastore_v2.json`` and label files in place, so a
SIGKILL during a save can leave an empty JSON that stops the next start. Here:

* image ids (new ones) and label tags must be plain names (``check_name``);
* label files, added images and the datastore JSON are written to a temporary file in the same
  folder, fsync'ed, then ``os.replace``'d over the target: a reader sees the old or the new file,
  and a symlink planted at the target is replaced, never written through;
* a JSON that cannot be parsed anyway (written by an older version) is set aside as
  ``datastore_v2.json.corrupt-<time>`` and the datastore is rebuilt from the files on disk.
"""

import glob
import json
import logging
import os
import re
import time
from typing import Any, Dict

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException, MONAILabelError, MONAILabelException

from .files import TEMP_SUFFIX, atomic_write

logger = logging.getLogger(__name__)

# One path component: no separators, never "." or "..", no hidden names. Covers file-name ids (Slicer
# names an uploaded image after its node: "MR Head"), DICOM UIDs and tags ("final", "<model>_uncertainty").
NAME = re.compile(r"\w[\w.+ -]{0,127}")
EXTENSION = re.compile(r"(\.[A-Za-z0-9_-]{1,16}){1,4}")


class InvalidName(MONAILabelException):
    """An id, tag or extension that is not a plain name (the app answers 400)."""

    def __init__(self, msg: str):
        super().__init__(MONAILabelError.INVALID_INPUT, msg)


def check_name(value, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise InvalidName(f"invalid {what} {value!r}: use 1-128 letters, digits, spaces, '_', '-', '+' or '.', "
                          "starting with a letter, digit or '_'")
    return value


def check_extension(value: str, what: str = "file extension") -> str:
    if not EXTENSION.fullmatch(value or ""):
        raise InvalidName(f"invalid {what} {value!r}: expected e.g. .nii.gz or .nrrd")
    return value


class HardenedDatastore(LocalDatastore):
    def __init__(self, datastore_path: str, **kwargs):
        self._remove_stale_temp_files(datastore_path, kwargs.get("labels_dir", "labels"))
        super().__init__(datastore_path, **kwargs)

    @staticmethod
    def _remove_stale_temp_files(root: str, labels_dir: str) -> None:
        """Temporary files of writes cut short by a kill (never referenced by the JSON)."""
        for pattern in (f".*{TEMP_SUFFIX}", f"{labels_dir}/*/.*{TEMP_SUFFIX}"):
            for path in glob.glob(os.path.join(glob.escape(root), pattern)):
                logger.info(f"Removing the remains of an interrupted write: {path}")
                os.remove(path)

    def has_image(self, image_id) -> bool:
        return isinstance(image_id, str) and image_id in self._datastore.objects

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        # Labels that another process saved (batch inference and training run in processes of their
        # own) are in the datastore JSON; reread it if it changed (a stat when it did not).
        self._init_from_datastore_file()
        return super().get_label_uri(label_id, label_tag)

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        derived_id, ext = self._to_id(os.path.basename(image_filename))
        image_id = check_name(image_id or derived_id, "image id")
        check_extension(ext)
        name = self._filename(image_id, ext)
        dest = os.path.join(self._datastore.image_path(), name)
        with FileLock(self._lock_file):
            atomic_write(dest, source_path=image_filename)
            info = dict(image_info or {}, ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        check_name(label_tag, "label tag")
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, ext = self._to_id(os.path.basename(label_filename))
        check_extension(ext)
        folder = self._datastore.label_path(label_tag)
        name = self._filename(image_id, ext)
        dest = os.path.join(folder, name)
        logger.info(f"Saving label {label_tag} of {image_id} ({ext})")
        with FileLock(self._lock_file):
            os.makedirs(folder, exist_ok=True)
            atomic_write(dest, source_path=label_filename)
            info = dict(label_info or {}, ts=int(time.time()), name=name)
            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        return image_id

    def _update_datastore_file(self, lock=True):
        def write():
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write(self._datastore_config_path, data=text.encode())
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _init_from_datastore_file(self, throw_exception=False):
        try:
            super()._init_from_datastore_file(throw_exception=True)
        except ValueError as error:
            aside = f"{self._datastore_config_path}.corrupt-{int(time.time())}"
            logger.error(f"Unreadable {self._datastore_config_path} ({error}); moved to {aside}, "
                         "rebuilding the datastore from the files on disk")
            with FileLock(self._lock_file):
                os.replace(self._datastore_config_path, aside)
            self._config_ts = 0


def hardened_datastore(studies: str):
    """The app's datastore for a studies folder, with MONAI Label's settings; None for a DICOMweb URL
    (MONAI Label's own datastore then: it writes only under its cache folder)."""
    from monailabel.config import settings

    if studies.startswith(("http://", "https://")):
        return None
    return HardenedDatastore(studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                             auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                             read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)
