"""What every model family's TaskConfig does: find the checkpoint, make the engine, load it in
the background, and return one task per entry of the model's registry `tasks`."""

import logging
import threading
from typing import Dict, Optional

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from ..checkpoint import CheckpointError, find_checkpoint
from ..click_training import tunable
from ..distillation import TEACHERS
from ..registry import get_spec
from ..tasks.clicks import ClickSegmentation, Propagation, UncertaintyBands
from ..tasks.train_clicks import ClickTraining
from ..tasks.train_distill import EncoderDistillation

logger = logging.getLogger(__name__)


class SamTaskConfig(TaskConfig):
    family = ""  # the registry family this config serves

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, **kwargs):
        """kwargs: settings (settings.AppSettings), images (the app's shared images.ImageCache)."""
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = kwargs["settings"]
        self.spec = get_spec(name)
        self.path = find_checkpoint(self.spec, model_dir, conf)
        self.missing = "" if self.path.is_file() else (
            f"checkpoint not found: put {self.spec.checkpoint_file} at {self.path} (download: {self.spec.source})")
        self.engine = self.spec.engine(self.spec, self.path, kwargs["images"], device=self.settings.device,
                                       dtype=self.settings.dtype_of(name), ensemble_dtype=self.settings.ensemble_dtype,
                                       weights=conf.get(f"{name}_weights", "latest"))

    def infer(self) -> Dict[str, InferTask]:
        name, tasks = self.name, {}
        if "clicks" in self.spec.tasks:
            tasks[name] = ClickSegmentation(self.engine, self.missing)
        if "uncertainty" in self.spec.tasks:  # where the self-ensemble disagrees, as labelled bands
            tasks[f"{name}_uncertainty"] = UncertaintyBands(self.engine, self.missing)
        if "propagation" in self.spec.tasks:  # a 2D model as a 3D task, propagating from the clicked slice
            tasks[f"{name}_3d"] = Propagation(self.engine, self.missing, self.settings.propagation_seconds)
        return tasks

    def trainer(self) -> Optional[TrainTask]:
        """The train task /train/<name> (SAM3D's decoder training); None: none."""
        return None

    def trainers(self) -> Dict[str, TrainTask]:
        """Every train task of the model, by its /train/ name: trainer() under the model's name, and
        for the 3D click models `<name>_finetune`, the click fine-tuning of the prompt encoder and
        mask decoder (samlabel.tasks.train_clicks); for a student of distillation.TEACHERS (FastSAM3D)
        `<name>_distill`, its encoder's distillation from the teacher entry's checkpoint
        (--conf <teacher>_checkpoint, else model/<its official file>; samlabel.tasks.train_distill)."""
        trainer = self.trainer()
        tasks = {self.name: trainer} if trainer is not None else {}
        if self.family == "clicks3d" and tunable(self.spec):
            tasks[f"{self.name}_finetune"] = ClickTraining(self.engine)
        if self.name in TEACHERS:
            teacher = get_spec(TEACHERS[self.name])
            tasks[f"{self.name}_distill"] = EncoderDistillation(self.engine, teacher,
                                                                find_checkpoint(teacher, self.model_dir, self.conf))
        return tasks

    def preload(self) -> None:
        """Load the weights in the background now, not on the first click."""
        if not self.missing:
            threading.Thread(target=self._load, daemon=True).start()

    def _load(self) -> None:
        try:
            self.load_weights()
        except CheckpointError as error:  # infer calls answer 503 with the same message
            logger.error(f"{self.spec.title}: {error}")

    def load_weights(self) -> None:
        self.engine.predictor()
