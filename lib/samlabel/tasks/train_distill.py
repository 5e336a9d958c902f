"""MONAI Label's train task of FastSAM3D's encoder distillation: POST /train/fastsam3d_distill
teaches FastSAM3D's 6-block image encoder SAM-Med3D-turbo's embeddings on 128^3 windows of the
datastore's images (samlabel.distillation: upstream's loss, optimiser, and the layer-wise option).

As the click fine-tuning task (tasks/train_clicks.py): MONAI Label runs it in a subprocess, or in
the server with run_sync; /info/ shows stats(), read from the stats file the run writes after
every crop cached and every epoch; check() refuses a request before the process starts; one run
at a time per model.

Data: every image of the datastore, labelled or not (distillation needs no labels): the window
around its `final` label's nonzero voxels when it has one, windows at random points inside it
otherwise (crops_per_image windows per image). Images the models cannot take (2D, 4D) are skipped
and named in the stats.

Files (under model/trained/<model>/, next to the official checkpoints, which are never written):
  <UTC time>.pth                  each run's whole network in the official checkpoint layout
                                  (load_model, samlabel-check-checkpoint and the official code read
                                  it), next to the fine-tuning runs'; the click engine serves the
                                  newest without a restart (--conf <model>_weights), and drops the
                                  cached embeddings of the encoder it replaces
  distillation/train_stats.json   the last run's progress and result
  distillation/.train.lock        held while a run goes
  distillation/teacher_targets/   per crop: the normalised window and the teacher's outputs
                                  (samlabel.distillation.TeacherTargets); the last run's crops only
"""

import logging
import time
from pathlib import Path
from typing import Dict, List

import torch
from monailabel.interfaces.datastore import Datastore

from ..checkpoint import CheckpointError, load_model
from ..click_training import write_weights
from ..distillation import (CachedCrop, Crop, DistillationHistory, DistillationSettings, TeacherTargets, depth_pairs,
                            distill, distilled_checkpoint, image_crops, mean_neck_mse)
from ..engine import ClickEngine, trained_folder
from ..errors import InputError
from ..images import file_key
from ..registry import ModelSpec
from ..request import short
from .train_base import (LABEL_TAG, LockedTrainTask, given_options, image_and_label, integer_option,
                         number_option, precision_options)

logger = logging.getLogger(__name__)

FOLDER, TARGETS = "distillation", "teacher_targets"
STARTS = ("latest", "official", "scratch")
DEFAULTS = {
    "max_epochs": 10,
    "iterations_per_epoch": 0,  # 0: each crop once per epoch
    "crops_per_image": 1,  # upstream: one label-centred window per case
    "learning_rate": 8e-4,
    "weight_decay": 0.1,
    "gradient_accumulation": 1,  # upstream 10
    "progressive_epochs": 0,  # 0: the neck MSE alone (upstream HEAD); E: one more block pair every E epochs (upstream 3)
    "seed": 12345,
    "device": "",  # "": the app's device
    "start": "latest",  # the weights served now (newest trained, else official), "official", or "scratch"
    "mixed_precision": False,  # bfloat16 autocast: CUDA only
}


def encoder_depth(spec: ModelSpec) -> int:
    with torch.device("meta"):
        return len(spec.builder().image_encoder.blocks)


class EncoderDistillation(LockedTrainTask):
    defaults = DEFAULTS

    def __init__(self, engine: ClickEngine, teacher: ModelSpec, teacher_checkpoint: Path):
        spec = engine.spec
        super().__init__(f"{spec.title}: distil {teacher.title}'s image encoder into its own on the datastore's images",
                         spec.name, trained_folder(engine.checkpoint, spec.name) / FOLDER)
        self.engine, self.teacher, self.teacher_checkpoint = engine, teacher, Path(teacher_checkpoint)
        self.pairs = depth_pairs(encoder_depth(spec), encoder_depth(teacher))

    def _check_data(self, options: Dict, datastore: Datastore) -> None:
        self._image_ids(datastore)
        self._teacher_file()
        if options["start"] != "scratch":
            self._start_file(options)

    # ---- the run --------------------------------------------------------------------------------------
    def _train(self, options: Dict, datastore: Datastore, stats: Dict) -> Dict:
        started = time.perf_counter()
        spec, device = self.engine.spec, torch.device(options["device"])
        teacher_file = self._teacher_file()
        start_file = None if options["start"] == "scratch" else self._start_file(options)
        stats.update(status="choosing crops")
        self._write_stats(stats)
        crops = self._crops(datastore, options, stats)

        teachers = []  # loaded on first need: not at all when every crop's targets are cached

        def teacher() -> torch.nn.Module:
            if not teachers:
                teachers.append(self._load(self.teacher, teacher_file, device))
            return teachers[0]

        depths = [t for _, t in self.pairs] if options["progressive_epochs"] else []
        store = TeacherTargets(self.folder / TARGETS, repr((file_key(str(teacher_file)), self.teacher.name)), depths)
        report: List[Dict] = []
        stats.update(status="caching teacher targets", crops=[c.name for c in crops], teacher=teacher_file.name,
                     teacher_targets=report)

        def on_crop(cached: CachedCrop) -> None:
            report.append({"crop": cached.crop.name, "reused": cached.reused})
            self._write_stats(stats)

        cached = store.prepare(crops, self.engine.images.get, spec.preprocess, lambda: teacher().image_encoder, device,
                               on_crop)
        model = self._student(start_file, teacher, options["seed"], device)
        teachers.clear()  # its memory goes to the training
        settings = DistillationSettings(options["max_epochs"], options["iterations_per_epoch"], options["learning_rate"],
                                        options["weight_decay"], options["gradient_accumulation"],
                                        options["progressive_epochs"], options["seed"], str(device),
                                        options["mixed_precision"])
        dtype = torch.bfloat16 if settings.mixed_precision else torch.float32
        iterations = settings.iterations_per_epoch or len(cached)
        before = mean_neck_mse(model.image_encoder, cached, device, dtype)
        stats.update(status="training", started_from=start_file.name if start_file else "scratch",
                     neck_mse_before=before, depth_pairs=[list(p) for p in self.pairs], total_iterations=settings.max_epochs * iterations)
        self._write_stats(stats)

        def on_epoch(history: DistillationHistory) -> None:
            epoch = len(history.losses)
            stats.update(epoch=epoch, iteration=epoch * iterations, loss=history.losses, neck_mse=history.neck_mse,
                         depth_levels=history.depth_levels, learning_rate=settings.learning_rate,
                         epoch_seconds=[round(s, 2) for s in history.seconds],
                         seconds_per_iteration=round(history.seconds[-1] / iterations, 4),
                         current_time=round(time.perf_counter() - started, 1))
            self._write_stats(stats)
            logger.info(f"epoch {epoch}/{settings.max_epochs}: loss {history.losses[-1]:.5f}, neck MSE "
                        f"{history.neck_mse[-1]:.5f}, {history.depth_levels[-1]} block pairs")

        history, optimizer = distill(model.image_encoder, cached, self.pairs, settings, on_epoch)
        after = mean_neck_mse(model.image_encoder, cached, device, dtype)
        written = write_weights(trained_folder(self.engine.checkpoint, spec.name), distilled_checkpoint(
            spec, model, optimizer, history, [c.name for c in crops], stats["started_from"], teacher_file.name))
        stats.update(status="done", neck_mse_after=after, written=written.name,
                     total_time=round(time.perf_counter() - started, 1), end_ts=int(time.time()))
        self._write_stats(stats)
        logger.info(f"{spec.name}: wrote {written} (neck MSE {before:.5f} -> {after:.5f})")
        return stats

    def _student(self, start_file, teacher, seed: int, device: torch.device):
        """The network to train: start_file's, or (None) a fresh encoder with the teacher's prompt
        encoder and mask decoder (the decoder that reads the embeddings the student learns)."""
        if start_file is not None:
            return self._load(self.engine.spec, start_file, device)
        torch.manual_seed(seed)
        model = self.engine.spec.builder().to(device)
        model.prompt_encoder.load_state_dict(teacher().prompt_encoder.state_dict())
        model.mask_decoder.load_state_dict(teacher().mask_decoder.state_dict())
        return model.eval()

    @staticmethod
    def _load(spec: ModelSpec, path: Path, device: torch.device):
        try:
            return load_model(spec, path, device)
        except CheckpointError as error:
            raise InputError(str(error)) from None

    def _teacher_file(self) -> Path:
        if not self.teacher_checkpoint.is_file():
            raise InputError(f"no teacher to distil from: {self.teacher.title}'s checkpoint {self.teacher_checkpoint} is "
                             f"missing (download: {self.teacher.source}; or --conf {self.teacher.name}_checkpoint <path>)")
        return self.teacher_checkpoint

    def _start_file(self, options: Dict) -> Path:
        spec = self.engine.spec
        path = self.engine.checkpoint if options["start"] == "official" else self.engine.weights_file()
        if not path.is_file():
            raise InputError(f"{spec.title}: no weights to start from: {path} is missing (download: {spec.source}); "
                             "or set start to 'scratch'")
        return path

    # ---- the data -------------------------------------------------------------------------------------
    def _image_ids(self, datastore: Datastore) -> List[str]:
        image_ids = sorted(datastore.list_images())
        if not image_ids:
            raise InputError(f"no images to distil {self.engine.spec.name} on: the datastore is empty")
        return image_ids

    def _crops(self, datastore: Datastore, options: Dict, stats: Dict) -> List[Crop]:
        """Every image's windows (see the module docstring); images the models cannot take are skipped."""
        labelled, crops, skipped = set(datastore.get_labeled_images(LABEL_TAG)), [], []
        for image_id in self._image_ids(datastore):
            image_path = datastore.get_image_uri(image_id)
            try:
                image = self.engine.images.get(image_path)
            except InputError as error:
                skipped.append(f"{image_id}: {error}")
                continue
            label = image_and_label(self.engine.images, image_id, image_path,
                                    datastore.get_label_uri(image_id, LABEL_TAG))[1] if image_id in labelled else None
            crops += image_crops(image_id, image_path, image, label, options["crops_per_image"], self.engine.spec,
                                 options["seed"])
        stats.update(skipped=skipped)
        if not crops:
            raise InputError(f"no 3D image to distil {self.engine.spec.name} on: {'; '.join(skipped)}")
        return crops

    # ---- options ----------------------------------------------------------------------------------------
    def _options(self, request: Dict) -> Dict:
        """The run's options: DEFAULTS overridden by the request's, checked."""
        given = given_options(DEFAULTS, request)
        if given["start"] not in STARTS:
            raise InputError(f"`start` must be one of {', '.join(STARTS)}, got {short(given['start'])}")
        options = {**{name: integer_option(given, name, low) for name, low in (
                      ("max_epochs", 1), ("iterations_per_epoch", 0), ("crops_per_image", 1),
                      ("gradient_accumulation", 1), ("progressive_epochs", 0), ("seed", 0))},
                   "learning_rate": number_option(given, "learning_rate"),
                   "weight_decay": number_option(given, "weight_decay", zero_ok=True),
                   "start": given["start"], **precision_options(given, self.engine.device)}
        return options
