"""MONAI Label's train task of the 3D click models: POST /train/<model>_finetune tunes the prompt
encoder and mask decoder of FastSAM3D / SAM-Med3D on the datastore's final labels with simulated
clicks (samlabel.click_training: upstream's click loop, loss and optimiser; the encoder frozen).

As SAM3D's train task (tasks/train_auto.py): MONAI Label runs it in a subprocess, or in the
server with run_sync; /info/ shows stats(), read from the stats file the run writes after every
epoch; check() refuses a request before the process starts; one run at a time per model.

Labels: every image with a `final` label; each nonzero value is one structure, trained in the
window the engine would place on it. Names do not matter: a click model segments whatever is
clicked.

Files (model/trained/<model>/, next to the official checkpoint; the official file is never written):
  <UTC time>.pth      each run's weights, the whole network in the official checkpoint layout
                      (load_model, samlabel-check-checkpoint and the official code read it); the
                      click engine serves the newest without a restart (--conf <model>_weights)
  train_stats.json    the last run's progress and result
  .train.lock         held while a run goes
"""

import logging
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore

from ..checkpoint import CheckpointError, load_model
from ..click_training import (DEFAULT_CLICKS, ClickExample, ClickTrainingHistory, ClickTrainingSettings,
                              WindowEmbeddings, official_layout, structure_example, train_clicks, write_weights)
from ..engine import ClickEngine, trained_folder
from ..errors import InputError
from ..request import short
from .train_base import (LABEL_TAG, LockedTrainTask, given_options, image_and_label, integer_option,
                         number_option, precision_options)

logger = logging.getLogger(__name__)

STARTS = ("latest", "official")
DEFAULTS = {
    "max_epochs": 10,
    "iterations_per_epoch": 0,  # 0: each labelled structure once per epoch
    "clicks": DEFAULT_CLICKS,  # steps of the click loop per sample (upstream 11)
    "learning_rate": 8e-5,
    "weight_decay": 0.1,
    "gradient_accumulation": 1,  # upstream 32, on thousands of cases
    "seed": 12345,
    "device": "",  # "": the app's device
    "start": "latest",  # the weights served now (newest fine-tuned, else official), or "official"
    "mixed_precision": False,  # bfloat16 autocast: CUDA only
    "embedding_cache_mb": 2048.0,  # window embeddings kept in memory; beyond, recomputed
}


class ClickTraining(LockedTrainTask):
    defaults = DEFAULTS

    def __init__(self, engine: ClickEngine):
        spec = engine.spec
        super().__init__(f"{spec.title}: fine-tune the prompt encoder and mask decoder on the final labels "
                         "with simulated clicks", spec.name, trained_folder(engine.checkpoint, spec.name))
        self.engine = engine

    def _check_data(self, options: Dict, datastore: Datastore) -> None:
        self._start_file(options)
        self._labelled(datastore)

    # ---- the run --------------------------------------------------------------------------------------
    def _train(self, options: Dict, datastore: Datastore, stats: Dict) -> Dict:
        started = time.perf_counter()
        spec, device = self.engine.spec, torch.device(options["device"])
        start_file = self._start_file(options)
        stats.update(status="reading labels")
        self._write_stats(stats)
        examples = self._examples(self._labelled(datastore))
        try:
            model = load_model(spec, start_file, device)
        except CheckpointError as error:
            raise InputError(str(error)) from None
        dtype = torch.bfloat16 if options["mixed_precision"] else torch.float32
        embeddings = WindowEmbeddings(model.image_encoder, self.engine.images.get, spec.preprocess, device,
                                      options["embedding_cache_mb"] * 2**20, dtype)
        settings = ClickTrainingSettings(options["max_epochs"], options["iterations_per_epoch"], options["clicks"],
                                         options["learning_rate"], options["weight_decay"],
                                         options["gradient_accumulation"], options["seed"], str(device),
                                         options["mixed_precision"])
        iterations = settings.iterations_per_epoch or len(examples)
        stats.update(status="training", started_from=start_file.name, structures=[e.name for e in examples],
                     total_iterations=settings.max_epochs * iterations)

        def on_epoch(history: ClickTrainingHistory) -> None:
            epoch = len(history.losses)
            stats.update(epoch=epoch, iteration=epoch * iterations, loss=history.losses, dice=history.dice,
                         learning_rate=history.learning_rates[-1], best_metric=max(history.dice),
                         best_metric_epoch=int(np.argmax(history.dice)) + 1, windows_encoded=embeddings.encoded,
                         epoch_seconds=[round(s, 2) for s in history.seconds],
                         seconds_per_iteration=round(history.seconds[-1] / iterations, 4),
                         current_time=round(time.perf_counter() - started, 1))
            self._write_stats(stats)
            logger.info(f"epoch {epoch}/{settings.max_epochs}: loss {history.losses[-1]:.4f}, "
                        f"Dice after {settings.clicks} steps {history.dice[-1]:.4f}, lr {history.learning_rates[-1]:.2e}")

        history, optimizer = train_clicks(model, examples, embeddings, settings, on_epoch)
        images = sorted({e.name.rsplit(": ", 1)[0] for e in examples})
        record = {"epoch": len(history.losses), "losses": list(history.losses), "dice": list(history.dice),
                  "used_datas": images, "started_from": start_file.name}
        written = write_weights(self.folder, official_layout(spec, model, optimizer, record))
        stats.update(status="done", written=written.name, total_time=round(time.perf_counter() - started, 1),
                     end_ts=int(time.time()))
        self._write_stats(stats)
        logger.info(f"{spec.name}: wrote {written} (Dice after {settings.clicks} steps {history.dice[-1]:.4f})")
        return stats

    def _start_file(self, options: Dict) -> Path:
        spec = self.engine.spec
        path = self.engine.checkpoint if options["start"] == "official" else self.engine.weights_file()
        if not path.is_file():
            raise InputError(f"{spec.title}: no weights to fine-tune: {path} is missing (download: {spec.source})")
        return path

    # ---- the data -------------------------------------------------------------------------------------
    def _labelled(self, datastore: Datastore) -> List[Tuple[str, str, str]]:
        """(image id, image path, label path) of every image with a final label."""
        labelled = [(image_id, datastore.get_image_uri(image_id), datastore.get_label_uri(image_id, LABEL_TAG))
                    for image_id in sorted(datastore.get_labeled_images(LABEL_TAG))]
        if not labelled:
            raise InputError(f"no labels to fine-tune {self.engine.spec.name} on: save a label with tag '{LABEL_TAG}' "
                             "(Submit Label) for at least one image")
        return labelled

    def _examples(self, labelled: List[Tuple[str, str, str]]) -> List[ClickExample]:
        """One example per structure (nonzero label value) of every labelled image."""
        examples = []
        for image_id, image_path, label_path in labelled:
            image, label = image_and_label(self.engine.images, image_id, image_path, label_path)
            values = np.rint(label).astype(np.int64)
            for value in np.unique(values[values != 0]):
                example = structure_example(f"{image_id}: {value}", image_path, image, values == value, self.engine.spec)
                if example is not None:
                    examples.append(example)
        if not examples:
            raise InputError(f"the final labels of {', '.join(l[0] for l in labelled)} are empty: nothing to learn")
        return examples

    # ---- options and stats ------------------------------------------------------------------------------
    def _options(self, request: Dict) -> Dict:
        """The run's options: DEFAULTS overridden by the request's, checked."""
        given = given_options(DEFAULTS, request)
        if given["start"] not in STARTS:
            raise InputError(f"`start` must be one of {', '.join(STARTS)}, got {short(given['start'])}")
        options = {**{name: integer_option(given, name, low) for name, low in (
                      ("max_epochs", 1), ("iterations_per_epoch", 0), ("clicks", 2), ("gradient_accumulation", 1),
                      ("seed", 0))},
                   "learning_rate": number_option(given, "learning_rate"),
                   "weight_decay": number_option(given, "weight_decay", zero_ok=True),
                   "embedding_cache_mb": number_option(given, "embedding_cache_mb"),
                   "start": given["start"], **precision_options(given, self.engine.device)}
        return options
