"""MONAI Label's train task of the automatic models (SAM3D): POST /train/<model> fine-tunes the
decoder on the datastore's final labels (samlabel.sam3d_training: the official loss, optimiser
and target pyramid, on cached encoder features).

MONAI Label runs it in a subprocess (`python -m monailabel.interfaces.utils.app -m train`) that
builds the app and calls the task, or in the server itself with run_sync; /info/ shows stats(),
read in the server from the stats file the run writes after every epoch.

Labels: every image with a `final` label. A label's values are the model's class ids, unless the
saved label names them: Slicer's Submit Label stores label_info [{"name", "idx"}, ...], a saved
automatic result its `label_names`; then each value maps by name (case-insensitive) to the class
the model gives that name (its registry `labels`).

Files, next to the official decoder file (model/<entry>/):
  trained/<UTC time>.model, .model.pkl   each run's decoder (nnU-Net v1's checkpoint layout) and a
                                         copy of the plans it was trained with; the engine serves the
                                         newest; the official file is never written
  trained/train_stats.json               the last run's progress and result (stats())
  trained/.train.lock                    held while a run goes: one run at a time per model
  feature_cache/<key>/features.npy, grid.json   encoder features per (image, plans, encoder)
"""

import logging
import pickle
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore

from .. import autoseg
from ..checkpoint import CheckpointError, read_checkpoint
from ..dicom import result_label_info
from ..engine_auto import TRAINED, AutoSegmentationEngine, trained_weights
from ..errors import InputError
from ..request import as_integer, boolean, short
from ..sam3d_checkpoint import load_sam3d, network_arguments, plans_path_of, read_plans, sam_encoder_state, stage_plans
from ..sam3d_training import (CaseSummary, FeatureStore, TrainingHistory, TrainingSettings, TrainingVolume,
                              derived_plans, encoder_identity, labels_on_network_grid, nnunet_checkpoint,
                              train_decoder, write_decoder_files)
from .train_base import (LABEL_TAG, LockedTrainTask, device_option, given_options, image_and_label, integer_option,
                         number_option)

logger = logging.getLogger(__name__)

FEATURE_CACHE = "feature_cache"
STARTS = ("latest", "official", "fresh")
DEFAULTS = {
    "max_epochs": 10,  # of upstream-size epochs: fine-tuning, not upstream's 1000 from scratch
    "iterations_per_epoch": 250,  # upstream's num_batches_per_epoch
    "batch_size": 0,  # 0: the plans' batch_size
    "learning_rate": 1e-2,
    "seed": 12345,
    "device": "",  # "": the app's device
    "start": "latest",  # the decoder served now (newest trained, else official), "official", or "fresh"
    "mirror_depth": True,
    "feature_cache_gb": 20.0,
}


class Sam3DTraining(LockedTrainTask):
    defaults = DEFAULTS

    def __init__(self, engine: AutoSegmentationEngine):
        spec = engine.spec
        super().__init__(f"{spec.title}: fine-tune the decoder on the final labels ({', '.join(spec.labels)})", spec.name,
                         engine.checkpoint.parent / TRAINED)
        self.engine = engine

    def _check_data(self, options: Dict, datastore: Datastore) -> None:
        self._examples(datastore)

    # ---- the run --------------------------------------------------------------------------------
    def _train(self, options: Dict, datastore: Datastore, stats: Dict) -> Dict:
        started = time.perf_counter()
        spec = self.engine.spec
        examples = self._examples(datastore)
        device = torch.device(options["device"])
        decoder_file, plans_file = self._files(options)
        plans_dict, plans_bytes = self._checked_plans(examples, plans_file)
        try:
            plans = autoseg.Plans.from_dict(plans_dict)
        except autoseg.PlansError as error:
            raise InputError(str(error)) from None
        if plans.num_modalities != 1:
            raise InputError(f"{spec.title} takes {plans.num_modalities} co-registered modalities; "
                             "training here uses single images")
        model = self._network(decoder_file, plans_file, plans_dict, device, options["seed"])
        decoder = model.decoder

        volumes = self._volumes(examples, plans, model, device, options, stats)
        del model  # the features are all there: the encoder's memory goes to the decoder

        settings = TrainingSettings(options["max_epochs"], options["iterations_per_epoch"],
                                    options["batch_size"] or int(stage_plans(plans_dict).get("batch_size", 2)),
                                    options["learning_rate"], options["seed"], str(device),
                                    batch_dice=len(plans_dict["plans_per_stage"]) > 1, mirror_depth=options["mirror_depth"])
        stats.update(status="training", started_from=decoder_file.name if decoder_file else "fresh",
                     plans="derived" if plans_file is None else plans_file.name, batch_size=settings.batch_size,
                     total_iterations=settings.max_epochs * settings.iterations_per_epoch)

        def on_epoch(history: TrainingHistory) -> None:
            epoch = len(history.losses)
            stats.update(epoch=epoch, iteration=epoch * settings.iterations_per_epoch, loss=history.losses,
                         dice=history.dice, learning_rate=history.learning_rates[-1], best_metric=max(history.dice),
                         best_metric_epoch=history.best_epoch, epoch_seconds=[round(s, 2) for s in history.seconds],
                         seconds_per_iteration=round(history.seconds[-1] / settings.iterations_per_epoch, 4),
                         current_time=round(time.perf_counter() - started, 1))
            self._write_stats(stats)
            logger.info(f"epoch {epoch}/{settings.max_epochs}: loss {history.losses[-1]:.4f}, "
                        f"training Dice {history.dice[-1]:.4f}, lr {history.learning_rates[-1]:.2e}")

        history, optimizer = train_decoder(decoder, volumes, plans.patch_size, settings, on_epoch)
        written = write_decoder_files(self.folder, nnunet_checkpoint(decoder, optimizer, history), plans_bytes)
        stats.update(status="done", written=written.name, total_time=round(time.perf_counter() - started, 1),
                     end_ts=int(time.time()))
        self._write_stats(stats)
        logger.info(f"{spec.name}: wrote {written} (training Dice {history.dice[-1]:.4f})")
        return stats

    def _volumes(self, examples: List[Tuple], plans: autoseg.Plans, model, device: torch.device, options: Dict,
                 stats: Dict) -> List[TrainingVolume]:
        """Every labelled image with its encoder features (from the cache, else computed into it) and
        its label on the network's grid; the cache's least recently used entries beyond its size go."""
        store = FeatureStore(self.folder.parent / FEATURE_CACHE, options["feature_cache_gb"] * 1e9)
        encoder = encoder_identity(self.engine.encoder_checkpoint, model.image_encoder)
        rng = np.random.default_rng(options["seed"])
        volumes, folders, report = [], [], []
        stats.update(status="caching features", images=len(examples), feature_cache=report)
        for example in examples:
            image, labels = self._image_and_classes(*example, plans.num_classes)
            cached = store.features(image, plans, encoder, model.encode, device, model.slices_per_batch)
            volumes.append(TrainingVolume.build(example[0], cached.features, cached.tiles,
                                                labels_on_network_grid(labels, cached.grid, plans), plans.patch_size, rng))
            folders.append(cached.folder)
            report.append({"image": example[0], "bytes": cached.bytes, "seconds": round(cached.seconds, 3),
                           "reused": cached.reused})
            logger.info(f"{example[0]}: features {'reused' if cached.reused else 'computed'} "
                        f"({cached.bytes / 1e6:.1f} MB, {cached.seconds:.1f} s), classes {sorted(volumes[-1].foreground)}")
            self._write_stats(stats)
        store.evict(folders)
        return volumes

    def _checked_plans(self, examples: List[Tuple], plans_file: Optional[Path]) -> Tuple[Dict, bytes]:
        """Every label checked (before any heavy work); the plans (dict, file content): plans_file's, else
        derived from the labelled images (a fresh decoder without official files)."""
        plans = self._read_plans(plans_file) if plans_file else None
        num_classes = network_arguments(plans, plans_file)["num_classes"] if plans else max(self.engine.spec.labels.values()) + 1
        summaries, labelled = [], 0
        for example in examples:
            image, labels = self._image_and_classes(*example, num_classes)
            labelled += bool(labels.any())
            if plans is None and labels.any():
                summaries.append(CaseSummary.of(image, labels))
        if not labelled:
            raise InputError(f"the final labels of {', '.join(e[0] for e in examples)} are empty: nothing to learn")
        if plans is not None:
            return plans, plans_file.read_bytes()
        info = derived_plans(summaries, self.engine.spec.input_size, num_classes)
        plans = info["plans"]
        logger.info(f"no plans: derived from the {len(summaries)} labelled images: target spacing "
                    f"{stage_plans(plans)['current_spacing'].tolist()} mm, {plans['normalization_schemes'][0]} "
                    f"normalisation {plans['dataset_properties']['intensityproperties'][0]}")
        return plans, pickle.dumps(info)

    def _files(self, options: Dict) -> Tuple[Optional[Path], Optional[Path]]:
        """(the decoder file to start from, None for a fresh one; its plans file, None when a fresh
        decoder has no plans to use: neither the official ones nor a trained decoder's)."""
        spec, official = self.engine.spec, self.engine.checkpoint
        if not self.engine.encoder_checkpoint.is_file():
            raise InputError(f"{spec.title}: the encoder {self.engine.encoder_checkpoint} is missing "
                             f"(download: {spec.source})")
        if options["start"] == "fresh":
            plans = [plans_path_of(official), *(plans_path_of(p) for p in reversed(trained_weights(official)))]
            return None, next((p for p in plans if p.is_file()), None)
        decoder_file = official if options["start"] == "official" else self.engine.decoder_file()
        if not decoder_file.is_file():
            raise InputError(f"{spec.title}: no decoder to fine-tune: {decoder_file} is missing (download: "
                             f"{spec.source}); or set start to 'fresh' to train a new decoder from the labels")
        if not plans_path_of(decoder_file).is_file():
            raise InputError(f"{spec.title}: the plans {plans_path_of(decoder_file)} are missing: the decoder's "
                             f"preprocessing, patch and classes come from them (download: {spec.source})")
        return decoder_file, plans_path_of(decoder_file)

    @staticmethod
    def _read_plans(plans_file: Path) -> Dict:
        try:
            return read_plans(plans_file)
        except CheckpointError as error:
            raise InputError(str(error)) from None

    def _network(self, decoder_file: Optional[Path], plans_file: Optional[Path], plans: Dict, device: torch.device,
                 seed: int):
        """SAM3D on `device`: the decoder from its file, or a fresh one (seeded default init, as upstream's)."""
        encoder_file, builder = self.engine.encoder_checkpoint, self.engine.spec.builder
        try:
            if decoder_file is not None:
                return load_sam3d(encoder_file, decoder_file, plans_file, device=device, builder=builder)[0]
            torch.manual_seed(seed)
            model = builder(**network_arguments(plans, plans_file or "derived plans"))
            model.image_encoder.load_state_dict(sam_encoder_state(read_checkpoint(encoder_file), model.image_encoder,
                                                                  encoder_file))
            return model.to(device).eval()
        except CheckpointError as error:
            raise InputError(str(error)) from None

    # ---- the data -----------------------------------------------------------------------------------
    def _examples(self, datastore: Datastore) -> List[Tuple[str, str, str, Optional[list]]]:
        """(image id, image path, label path, named values or None) of every image with a final label."""
        examples = []
        for image_id in sorted(datastore.get_labeled_images(LABEL_TAG)):
            info = datastore.get_label_info(image_id, LABEL_TAG) or {}
            named = info.get("label_info") or result_label_info(info.get("params"))
            examples.append((image_id, datastore.get_image_uri(image_id), datastore.get_label_uri(image_id, LABEL_TAG),
                             named or None))
        if not examples:
            raise InputError(f"no labels to train {self.engine.spec.name} on: save a label with tag '{LABEL_TAG}' "
                             "(Submit Label) for at least one image")
        return examples

    def _image_and_classes(self, image_id: str, image_path: str, label_path: str, names: Optional[list],
                           num_classes: int):
        """(the stored image, its label as the model's class ids (i, j, k) uint8)."""
        image, label = image_and_label(self.engine.images, image_id, image_path, label_path)
        values = np.rint(label).astype(np.int64) if np.issubdtype(label.dtype, np.floating) else label.astype(np.int64)
        if np.issubdtype(label.dtype, np.floating) and not np.array_equal(values, label):
            raise InputError(f"the final label of {image_id} holds non-integer values: save a label map")
        classes = np.zeros(values.shape, np.uint8)
        for value, class_id in self._class_ids(image_id, np.unique(values[values != 0]), names, num_classes).items():
            classes[values == value] = class_id
        return image, classes

    def _class_ids(self, image_id: str, values: np.ndarray, names: Optional[list], num_classes: int) -> Dict[int, int]:
        """label value -> the model's class id (see the module docstring)."""
        spec = self.engine.spec
        known = {name.lower(): class_id for name, class_id in spec.labels.items()}
        known_text = ", ".join(f"{name!r}" for name in spec.labels)
        if names is None:
            wrong = [int(v) for v in values if not 0 < v < num_classes]
            if wrong:
                raise InputError(f"the final label of {image_id} holds values {wrong[:5]} that are not classes of "
                                 f"{spec.name} (1 to {num_classes - 1}); name the label's segments ({known_text}) "
                                 "or use the model's class ids")
            return {int(v): int(v) for v in values}
        entries = [entry for entry in names if isinstance(entry, dict)]
        if any(as_integer(entry.get("idx")) is not None for entry in entries):
            by_value = {as_integer(entry.get("idx")): str(entry.get("name", "")).strip() for entry in entries}
        else:  # no "idx": MONAI Label pairs the i-th entry with the i-th value
            by_value = {int(v): str(entry.get("name", "")).strip() for v, entry in zip(values, entries)}
        mapping = {}
        for value in (int(v) for v in values):
            if value not in by_value:
                raise InputError(f"the final label of {image_id} holds value {value}, which its label_info does not "
                                 f"name (it names {sorted(k for k in by_value if k is not None)})")
            class_id = known.get(by_value[value].lower())
            if class_id is None:
                raise InputError(f"the final label of {image_id}: unknown label name {short(by_value[value])} "
                                 f"(value {value}); {spec.name} segments {known_text}")
            mapping[value] = class_id
        return mapping

    # ---- settings and stats ----------------------------------------------------------------------------
    def _options(self, request: Dict) -> Dict:
        """The run's options: DEFAULTS overridden by the request's, checked."""
        given = given_options(DEFAULTS, request)
        if given["start"] not in STARTS:
            raise InputError(f"`start` must be one of {', '.join(STARTS)}, got {short(given['start'])}")
        return {**{name: integer_option(given, name, low)
                   for name, low in (("max_epochs", 1), ("iterations_per_epoch", 1), ("batch_size", 0), ("seed", 0))},
                "learning_rate": number_option(given, "learning_rate"),
                "feature_cache_gb": number_option(given, "feature_cache_gb", zero_ok=True),
                "start": given["start"], "mirror_depth": boolean(given, "mirror_depth"),
                "device": device_option(given, self.engine.device)}
