"""The engine of the automatic models (SAM3D): one network served to many users, no prompts.

It owns the network (loaded lazily from its three files, and reloaded when a training run has
written newer decoder weights), the encoder-feature cache, and the one lock that serialises use
of the network. A segmentation reads the image as MONAI Label does, runs SAM3D's official
pipeline (samlabel.autoseg) and gives back the label map on the image's own grid.

Decoder weights: the official file, or the newest one a training run wrote next to it under
`trained/` (versioned files, the official one is never overwritten; --conf <model>_weights picks
"official", "latest" (default) or a file name under trained/).
"""

import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import autoseg
from .engine import TRAINED  # where training runs write their weights, next to the official file
from .images import ImageCache
from .registry import ModelSpec
from .sam3d_checkpoint import load_sam3d, plans_path_of



def trained_weights(checkpoint: Path) -> list:
    """Decoder files written by training runs for this model, oldest first (names sort by time)."""
    folder = checkpoint.parent / TRAINED
    return sorted(folder.glob("*.model")) if folder.is_dir() else []


class AutoSegmentationEngine:
    dimension = 3

    def __init__(self, spec: ModelSpec, checkpoint, images: Optional[ImageCache] = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, encoder_checkpoint=None, weights: str = "latest",
                 feature_cache_bytes: float = 2e9):
        self.spec, self.device, self.dtype = spec, device, dtype
        self.checkpoint = Path(checkpoint)
        self.encoder_checkpoint = Path(encoder_checkpoint) if encoder_checkpoint else self.checkpoint.parent / spec.encoder_checkpoint_file
        self.images = images or ImageCache()
        self.weights = weights
        self.features = autoseg.FeatureCache(feature_cache_bytes)
        self._loaded: Tuple = ()  # (decoder file, its mtime) of the network held
        self._model, self._plans = None, None
        self._lock = threading.RLock()  # one user of the network at a time; loading it (preload, reload) too

    def decoder_file(self) -> Path:
        """The decoder weights to serve now (see the module docstring)."""
        if self.weights == "official":
            return self.checkpoint
        if self.weights != "latest":
            return self.checkpoint.parent / TRAINED / self.weights  # when absent, missing_files() says so
        trained = trained_weights(self.checkpoint)
        return trained[-1] if trained else self.checkpoint

    def missing_files(self) -> List[str]:
        """The files the served decoder needs that are not there (none: it can run)."""
        decoder = self.decoder_file()
        return [str(p) for p in (decoder, plans_path_of(decoder), self.encoder_checkpoint) if not p.is_file()]

    def missing_message(self) -> str:
        missing = self.missing_files()
        return f"checkpoint files not found: {', '.join(missing)} (download: {self.spec.source})" if missing else ""

    def model(self):
        """(network, autoseg.Plans), loaded on first use and again when the decoder file changed."""
        with self._lock:
            path = self.decoder_file()
            state = (path, path.stat().st_mtime_ns if path.is_file() else None)
            if state != self._loaded:
                model, plans = load_sam3d(self.encoder_checkpoint, path, plans_path_of(path), device=self.device,
                                          builder=self.spec.builder)
                self._model, self._plans, self._loaded = model, autoseg.Plans.from_dict(plans), state
            return self._model, self._plans

    def segment(self, image_path: str, mirror: bool = False) -> Dict:
        """data for the task's writer: "pred" (uint8 label values on the image grid), "affine", "result"."""
        started = time.perf_counter()
        encoded = []  # slices the encoder ran on (the rest came from the feature cache)

        def encode(slices: torch.Tensor) -> torch.Tensor:
            encoded.append(slices.shape[2])
            return model.encode(slices)

        with self._lock:
            model, plans = self.model()
            image = self.images.get(image_path, channels=plans.num_modalities)
            volumes = image.array if image.array.ndim == 3 else np.moveaxis(image.array, -1, 0)  # (M, i, j, k)
            with torch.autocast(device_type=torch.device(self.device).type, dtype=self.dtype,
                                enabled=self.dtype != torch.float32):
                classes = autoseg.segment(volumes, image.affine, plans, encode, model.decode, mirror=mirror,
                                          cache=self.features, image_key=image.key, device=self.device)
        pred = np.zeros(classes.shape, np.uint8)
        for value in self.spec.labels.values():  # only the named classes, with their upstream values
            pred[classes == value] = value
        info = {"model": self.spec.name, "weights": self._loaded[0].name, "mirroring": mirror,
                "encoded_slices": sum(encoded),
                "labels_found": sorted(name for name, value in self.spec.labels.items() if (pred == value).any()),
                "seconds": round(time.perf_counter() - started, 3)}
        return {"pred": pred, "affine": image.affine, "result": info}
