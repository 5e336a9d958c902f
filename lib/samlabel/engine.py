"""What the 3D and 2D click engines share: one model served to many users.

An engine owns its model (loaded lazily, or given ready), the caches (images, embeddings,
interactions), the self-ensemble branch, and its own record of each client's latest committed
request. A click runs in two steps, so that nothing changes when a request fails:

    data = engine.predict(image_path, request)   # model work; data["logits"], data["geometry"]
    ... post-transforms (transforms.click_post_transforms) and writing the result ...
    engine.commit(data)                           # only now the interaction state advances

`segment` does all three, for callers without MONAI Label (tests, benchmarks).

Weights: the official checkpoint, or the newest file a training run (click fine-tuning, FastSAM3D's
encoder distillation) wrote under `<checkpoint folder>/trained/<model>/` (versioned, the official
file is never written); `weights` (--conf <model>_weights) picks "latest" (default), "official" or a
file name there. The predictor is loaded again when that file changes, without a restart.
"""

import threading
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from .cache import LRUCache
from .checkpoint import load_model
from .device import compute_dtype
from .images import ImageCache, StoredImage
from .registry import ModelSpec
from .request import Click, ClickRequest
from .results import ClickResult
from .transforms import click_post_transforms
from .uncertainty import EnsembleConfig


@dataclass(frozen=True)
class Interaction:
    """What one user's segmentation of one structure carries from click to click."""

    image_key: Tuple  # the image file it was made on: a replaced file starts afresh
    clicks: List[Click]  # as received
    place: Any  # where the model looked: the 3D window, or the 2D slice index
    low_res_logits: Optional[np.ndarray] = None  # the result's, fed back as the next mask prompt


TRAINED = "trained"  # folder next to the official checkpoint where training runs write theirs


def trained_folder(checkpoint: Path, model: str) -> Path:
    """Where training runs write `model`'s weights: per model, as the click models' official
    files share one folder."""
    return checkpoint.parent / TRAINED / model


def trained_weights(checkpoint: Path, model: str) -> List[Path]:
    """Weights written by training runs for `model`, oldest first (names sort by time)."""
    folder = trained_folder(checkpoint, model)
    return sorted(folder.glob("*.pth")) if folder.is_dir() else []


class ClickEngine:
    dimension: int  # 3: volumetric clicks; 2: slice by slice

    def __init__(self, spec: ModelSpec, checkpoint=None, images: Optional[ImageCache] = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, predictor=None, embeddings: int = 32, interactions: int = 256,
                 clients: int = 1024, ensemble: EnsembleConfig = EnsembleConfig(), weights: str = "latest",
                 ensemble_dtype: Optional[torch.dtype] = None):
        """predictor: a ready predictor (tests, benchmarks); else the weights (weights_file()) are
        loaded on first use, and again when that file changes. ensemble_dtype: the self-ensemble
        members' precision (None: dtype)."""
        self.spec, self.device, self.dtype = spec, device, dtype
        self.ensemble_dtype = ensemble_dtype or dtype
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.weights = weights
        self._loaded: Tuple = ()  # (weights file, its mtime) of the predictor held; () for a given one
        self.images = images or ImageCache()
        self.embeddings = LRUCache(embeddings)
        self.interactions = LRUCache(interactions)  # interaction key -> Interaction
        self.latest = LRUCache(clients)  # (client, image) -> the latest committed ClickRequest
        self.ensemble = ensemble  # the sampling of self-ensemble members; the request sets the size
        self.encoder_runs = 0
        self._predictor = predictor
        self._load_lock = threading.Lock()
        self._model_lock = threading.Lock()  # the predictor holds one embedding: one request at a time

    def make_predictor(self, model: torch.nn.Module):
        raise NotImplementedError

    def weights_file(self) -> Path:
        """The weights to serve now (see the module docstring)."""
        if self.weights == "official":
            return self.checkpoint
        if self.weights != "latest":
            return trained_folder(self.checkpoint, self.spec.name) / self.weights
        trained = trained_weights(self.checkpoint, self.spec.name)
        return trained[-1] if trained else self.checkpoint

    def weights_name(self) -> Optional[str]:
        """The file name of the weights held (None: a predictor given ready)."""
        return self._loaded[0].name if self._loaded else None

    def predictor(self):
        """The predictor, loaded on first use and again when weights_file() changed. Cached
        embeddings stay valid when the new weights have the same image encoder (fine-tuning keeps it)
        and are dropped when it differs (distillation changes it)."""
        with self._load_lock:
            if self._predictor is not None and not self._loaded:
                return self._predictor  # given ready
            path = self.weights_file()
            state = (path, path.stat().st_mtime_ns if path.is_file() else None)
            if state != self._loaded:
                model = load_model(self.spec, path, self.device)
                with self._model_lock:
                    if self._predictor is not None and not same_encoder(self._predictor.model, model):
                        self.embeddings = LRUCache(self.embeddings.capacity)
                    self._predictor, self._loaded = self.make_predictor(model), state
            return self._predictor

    def predict(self, image_path: str, request: ClickRequest) -> dict:
        """The model's answer before post-transforms: data["logits"] ((N, C, *grid) on the host),
        data["geometry"] (where they lie on the image), data["result"] (the JSON), data["affine"],
        and for commit: data["click_request"], data["image_path"], data["interaction"]."""
        raise NotImplementedError

    def post_transforms(self) -> list:
        return click_post_transforms()

    def post(self, data: dict) -> dict:
        for transform in self.post_transforms():
            data = transform(data)
        return data

    def segment(self, image_path: str, request: ClickRequest, commit: bool = True) -> ClickResult:
        """One click end to end: predict, post-transforms, commit (unless commit=False: a look)."""
        data = self.post(self.predict(image_path, request))
        if commit:
            self.commit(data)
        return ClickResult.from_data(data)

    def commit(self, data: dict) -> None:
        """Advance the interaction: its state now holds this result's (ensemble-mean) logits."""
        pending = data.get("interaction")
        if pending is None:
            return
        request, image_path = data["click_request"], data["image_path"]
        self.interactions.put(request.interaction_key(image_path), replace(pending, low_res_logits=data["logits"]))
        self.latest.put((request.client, image_path), request)

    def latest_request(self, client: Optional[str], image_path: str) -> Optional[ClickRequest]:
        return self.latest.get((client, image_path))

    def previous(self, request: ClickRequest, image_path: str, image: StoredImage, clicks: List[Click]) -> Optional[Interaction]:
        """The interaction this request continues, or None: after a reset, on a changed image file,
        or when the request's clicks do not contain the previous ones (another segment, a removed click)."""
        if request.reset:
            return None
        previous = self.interactions.get(request.interaction_key(image_path))
        if previous is None or previous.image_key != image.key or Counter(previous.clicks) - Counter(clicks):
            return None
        return previous

    def decode(self, predictor, prompts: dict, previous_logits: Optional[np.ndarray], ensemble_size: int):
        """(logits (N, 1, *grid), IoU of the first): one prompt set, or with ensemble_size > 0 the
        N member prompt sets drawn from the first result, decoded in one batch."""
        logits, iou = self.spec.prompt.decode(predictor, prompts, previous_logits)
        if ensemble_size:
            config = replace(self.ensemble, size=ensemble_size)
            members = self.spec.prompt.members(prompts, logits, config, self.spec.input_size[0])
            with compute_dtype(predictor, self.ensemble_dtype):
                logits, _ = self.spec.prompt.decode(predictor, members, previous_logits)
        return logits, iou


def same_encoder(old: torch.nn.Module, new: torch.nn.Module) -> bool:
    """Whether two networks' image encoders hold equal weights (their embeddings are interchangeable)."""
    if not (hasattr(old, "image_encoder") and hasattr(new, "image_encoder")):
        return False
    old_state, new_state = old.image_encoder.state_dict(), new.image_encoder.state_dict()
    return old_state.keys() == new_state.keys() and all(torch.equal(old_state[k], new_state[k].to(old_state[k].device))
                                                        for k in old_state)
