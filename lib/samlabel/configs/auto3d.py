"""The automatic 3D models (SAM3D): a segmentation task, and a train task that fine-tunes the
decoder on the datastore's saved labels.

Three files per model: its decoder (`<name>_checkpoint`, default model/<official file>), the
plans pickle next to it (`<file>.pkl`), and Meta's SAM ViT-B encoder, shared by every SAM3D
entry (`sam_vit_b_checkpoint`, default model/sam_vit_b_01ec64.pth).
"""

from pathlib import Path
from typing import Dict

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask

from ..checkpoint import find_checkpoint
from ..registry import get_spec
from ..tasks.auto import AutoSegmentation
from ..tasks.train_auto import Sam3DTraining
from .base import SamTaskConfig


class AutoSeg3DConfig(SamTaskConfig):
    family = "auto3d"

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, **kwargs):
        TaskConfig.init(self, name, model_dir, conf, planner, **kwargs)  # not the click models' engine set-up
        self.settings = kwargs["settings"]
        self.spec = get_spec(name)
        self.path = find_checkpoint(self.spec, model_dir, conf)
        encoder = Path(conf.get("sam_vit_b_checkpoint") or Path(model_dir) / self.spec.encoder_checkpoint_file)
        self.engine = self.spec.engine(self.spec, self.path, kwargs["images"], device=self.settings.device,
                                       dtype=self.settings.dtype_of(name), encoder_checkpoint=encoder,
                                       weights=conf.get(f"{name}_weights", "latest"))
        self.missing = self.engine.missing_message()  # a decoder trained here counts as present

    def infer(self) -> Dict[str, InferTask]:
        return {self.name: AutoSegmentation(self.engine, self.missing)} if "segmentation" in self.spec.tasks else {}

    def load_weights(self) -> None:
        self.engine.model()

    def trainer(self):
        """/train/<name>: fine-tunes the decoder on the datastore's final labels."""
        return Sam3DTraining(self.engine) if "training" in self.spec.tasks else None
