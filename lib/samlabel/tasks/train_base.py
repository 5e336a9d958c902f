"""What the app's MONAI Label train tasks share: one run at a time, progress in a stats file.

MONAI Label runs a train task in a subprocess (`python -m monailabel.interfaces.utils.app -m train`)
that builds the app and calls the task, or in the server with run_sync; /info/ shows stats(), read in
the server from the file the run writes. Each task keeps, in its `folder`:
  train_stats.json   the last run's progress and result
  .train.lock        held while a run goes (an OS file lock: released when its process ends, however)
A subclass gives `_options` (the request's options, checked), `_check_data` (what a run would refuse in
the datastore) and `_train` (the run, updating the stats dict it is given).
"""

import json
import logging
import math
import time
from pathlib import Path
from typing import Dict

import torch
from filelock import FileLock, Timeout
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from ..errors import InputError
from ..files import atomic_write
from ..images import ImageCache, load_image
from ..request import as_integer, boolean, short

logger = logging.getLogger(__name__)

LABEL_TAG = DefaultLabelTag.FINAL.value  # the labels a run learns from
STATS_FILE, LOCK_FILE = "train_stats.json", ".train.lock"


def given_options(defaults: Dict, request: Dict) -> Dict:
    """The task's defaults overridden by the request's values (empty ones do not count)."""
    return {**defaults, **{k: request[k] for k in defaults if request.get(k) not in (None, "")}}


def integer_option(given: Dict, name: str, low: int) -> int:
    number = as_integer(given[name])
    if number is None or number < low:
        raise InputError(f"`{name}` must be an integer >= {low}, got {short(given[name])}")
    return number


def number_option(given: Dict, name: str, above: float = 0.0, zero_ok: bool = False) -> float:
    try:
        number = float(given[name])
    except (TypeError, ValueError):
        number = float("nan")
    if not (math.isfinite(number) and (number > above or zero_ok and number == 0)):
        raise InputError(f"`{name}` must be a number > {above:g}, got {short(given[name])}")
    return number


def device_option(given: Dict, default: str) -> str:
    device = str(given["device"] or default)
    if device.split(":")[0] not in ("cpu", "cuda") or device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"`device` must be cpu or cuda (on a machine with a CUDA device), got {short(device)}")
    return device


def precision_options(given: Dict, default_device: str) -> Dict:
    """The run's `device` and `mixed_precision` (bfloat16 autocast, which needs CUDA), checked together."""
    device = device_option(given, default_device)
    mixed_precision = boolean(given, "mixed_precision")
    if mixed_precision and not device.startswith("cuda"):
        raise InputError(f"`mixed_precision` (bfloat16 autocast) needs a CUDA device; the run would use {device}")
    return {"device": device, "mixed_precision": mixed_precision}


def image_and_label(images: ImageCache, image_id: str, image_path: str, label_path: str):
    """(the stored image, its final label's array), checked to lie on the same grid."""
    image = images.get(image_path)  # InputError for a 2D image
    try:
        label = load_image(label_path).array
    except InputError as error:
        raise InputError(f"the final label of {image_id}: {error}") from None
    if label.shape != image.array.shape:
        raise InputError(f"the final label of {image_id} has shape {tuple(label.shape)}, its image "
                         f"{tuple(image.array.shape)}: save the label on the image's grid")
    return image, label


class RunLock:
    """The lock a training run holds."""

    def __init__(self, path: Path):
        self._lock = FileLock(str(path))

    def take(self) -> bool:
        try:
            self._lock.acquire(timeout=0)
            return True
        except Timeout:
            return False

    def release(self) -> None:
        self._lock.release()

    def is_free(self) -> bool:
        if not self.take():
            return False
        self.release()
        return True


class LockedTrainTask(TrainTask):
    defaults: Dict = {}  # the task's config: its options and their defaults

    def __init__(self, description: str, name: str, folder: Path):
        super().__init__(description)
        self.name, self.folder = name, Path(folder)
        self.stats_path = self.folder / STATS_FILE

    def config(self) -> Dict:
        return dict(self.defaults)

    def stats(self) -> Dict:
        try:
            stats = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):  # no run yet
            return {}
        if stats.get("status") not in ("done", "error") and self._lock().is_free():
            stats["status"] = "stopped"  # the run's process ended mid-way (DELETE /train/, or killed)
        return stats

    def check(self, request: Dict, datastore: Datastore) -> None:
        """What a run would refuse, asked before MONAI Label starts its process (InputError: 400)."""
        options = self._options(request)
        if self.folder.is_dir() and not self._lock().is_free():
            raise self._running()
        self._check_data(options, datastore)

    def __call__(self, request: Dict, datastore: Datastore) -> Dict:
        options = self._options(request)
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = self._lock()
        if not lock.take():
            raise self._running()
        stats = {"status": "starting", "model": self.name, "start_ts": int(time.time()), "epoch": 0,
                 "total_epochs": options["max_epochs"], "options": options}
        try:
            self._write_stats(stats)
            return self._train(options, datastore, stats)
        except Exception as error:
            stats.update(status="error", error=f"{type(error).__name__}: {error}")
            self._write_stats(stats)
            logger.error(f"{self.name} training failed: {error}")
            raise
        finally:
            lock.release()

    def _options(self, request: Dict) -> Dict:
        raise NotImplementedError

    def _check_data(self, options: Dict, datastore: Datastore) -> None:
        raise NotImplementedError

    def _train(self, options: Dict, datastore: Datastore, stats: Dict) -> Dict:
        raise NotImplementedError

    def _running(self) -> InputError:
        return InputError(f"a training run of {self.name} is already going; wait for it to end (or stop it: DELETE /train/)")

    def _lock(self) -> RunLock:
        return RunLock(self.folder / LOCK_FILE)

    def _write_stats(self, stats: Dict) -> None:
        atomic_write(str(self.stats_path), data=json.dumps(stats, indent=1, default=str).encode())
