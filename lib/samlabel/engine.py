"""Interactive click segmentation with the 3D models: caches, per-user state, one click end to end.

Per click: the stored image comes from a cache (path, size, mtime); the model window is kept
while the clicks stay inside it, so its embedding (cached per model and window) is reused and
only the decoder runs; the previous low-res logits of the same interaction are the mask prompt.
"""

import os
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .checkpoint import load_model
from .geometry import Window, apply, logits_to_image, place_window, sample_window
from .predictor import SamPredictor3D
from .registry import ModelSpec
from .uncertainty import EnsembleConfig, SelfEnsemble

WINDOW_MARGIN_VOXELS = 4  # a click closer than this to the window's faces moves the window


class InputError(ValueError):
    """The request cannot be served as given (the message says why); nothing was cached."""


class LRUCache:
    """Thread-safe LRU mapping bounded by a total cost (bytes, or 1 per item)."""

    def __init__(self, capacity: float, cost: Callable[[object], float] = lambda value: 1):
        self.capacity, self.cost = capacity, cost
        self._items: "OrderedDict[Hashable, object]" = OrderedDict()
        self._total = 0.0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key, default=None):
        with self._lock:
            if key not in self._items:
                self.misses += 1
                return default
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value) -> None:
        with self._lock:
            if key in self._items:
                self._total -= self.cost(self._items.pop(key))
            self._items[key] = value
            self._total += self.cost(value)
            while self._total > self.capacity and len(self._items) > 1:
                _, evicted = self._items.popitem(last=False)
                self._total -= self.cost(evicted)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class StoredImage:
    """An image as stored: array in file axis order, affine voxel index -> RAS mm."""

    key: Tuple  # (path, size, mtime): changes when the file changes
    array: np.ndarray
    affine: np.ndarray


def load_image(path: str) -> StoredImage:
    """Read a 3D volume (NIfTI, NRRD, DICOM folder...) with MONAI's LoadImage, as MONAI Label does,
    so voxel indices mean what the front ends send. Raises InputError for what cannot be served."""
    from monai.transforms import LoadImage

    stat = os.stat(path)
    try:
        image = LoadImage(image_only=True, dtype=None)(path)
    except Exception as error:  # noqa: BLE001 - readers raise many types; the client needs the message
        raise InputError(f"cannot read image {os.path.basename(path)}: {error}") from None
    array = np.asarray(image.array)
    while array.ndim > 3 and array.shape[-1] == 1:  # (X, Y, Z, 1) volumes
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"the 3D models need a 3D volume; this image has shape {tuple(array.shape)}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError("the image contains NaN or infinite values")
    affine = np.asarray(image.affine, dtype=np.float64)
    return StoredImage((path, stat.st_size, stat.st_mtime_ns), array, affine)


class ImageCache:
    """Loaded images by path, reloaded when the file's size or mtime changes; bounded in bytes."""

    def __init__(self, max_bytes: float = 2e9):
        self._cache = LRUCache(max_bytes, cost=lambda image: image.array.nbytes)
        self._lock = threading.Lock()

    def get(self, path: str) -> StoredImage:
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        image = self._cache.get(key)
        if image is None:
            with self._lock:  # one reader per image at a time
                image = self._cache.get(key)
                if image is None:
                    image = load_image(path)
                    self._cache.put(key, image)
        return image


@dataclass
class Interaction:
    """What one user's segmentation of one structure carries from click to click."""

    window: Window
    clicks: List[Tuple[Tuple[int, int, int], int]]  # ((i, j, k), label) as received
    low_res_logits: torch.Tensor  # (1, 1, 32, 32, 32)


@dataclass
class ClickResult:
    mask: np.ndarray  # uint8 on the image's own grid
    affine: np.ndarray  # the image's: voxel index -> RAS mm
    window: Optional[Window]  # the 3D model's window (None for slice models)
    info: Dict = field(default_factory=dict)
    uncertainty: Optional[np.ndarray] = None  # float32 ensemble std on the image's grid, when asked for


def normalise_intensity(window_volume: torch.Tensor) -> torch.Tensor:
    """The official ZNormalization(masking_method=x > 0) on the window: mean and (unbiased) std
    of voxels > 0 applied to every voxel. Windows without such voxels use all voxels."""
    foreground = window_volume[window_volume > 0]
    values = foreground if foreground.numel() > 1 else window_volume.reshape(-1)
    std = values.std()
    return (window_volume - values.mean()) / (std if std > 0 else 1.0)


class ClickSegmenter3D:
    """One 3D model served to many users: lazy model load, embedding cache, interaction state."""

    def __init__(self, spec: ModelSpec, checkpoint, images: ImageCache, device: str = "cpu",
                 embeddings: int = 32, interactions: int = 256):
        self.spec, self.checkpoint, self.images, self.device = spec, checkpoint, images, device
        self.embeddings = LRUCache(embeddings)
        self.interactions = LRUCache(interactions)
        self.encoder_runs = 0
        self.latest: Dict = {}  # (client_id, image) -> the latest interaction's (key, foreground, background)
        self._predictor: Optional[SamPredictor3D] = None
        self._model_lock = threading.Lock()

    def predictor(self) -> SamPredictor3D:
        with self._model_lock:
            if self._predictor is None:
                self._predictor = SamPredictor3D(load_model(self.spec, self.checkpoint, self.device))
            return self._predictor

    def segment(self, image_path: str, foreground: Sequence, background: Sequence, interaction_key: Hashable,
                reset: bool = False, ensemble: Optional[EnsembleConfig] = None, persist: bool = True) -> ClickResult:
        """One click: the mask on the image's grid. With `ensemble`, the result is the mean of N
        decoder runs on prompts sampled from the first mask, and `uncertainty` their std.
        persist=False leaves the interaction state as it was (a look at the current state)."""
        image = self.images.get(image_path)
        clicks = validate_clicks(foreground, background, image.array.shape)
        clicks_ras = apply(image.affine, [point for point, _ in clicks])
        size = self.spec.input_size[0]

        previous = None if reset else self.interactions.get(interaction_key)
        if previous is not None and Counter(previous.clicks) - Counter(clicks):
            previous = None  # clicks were removed or changed: a new interaction
        keep_window = previous is not None and previous.window.contains(clicks_ras, WINDOW_MARGIN_VOXELS).all()
        if keep_window:
            window = previous.window
        else:  # all clicks where they fit, else centred on the newest click
            known = set(previous.clicks) if previous is not None else set()
            positives = [i for i, click in enumerate(clicks) if click[1] == 1]
            new = [i for i in positives if clicks[i] not in known] or positives
            window = place_window(image.affine, clicks_ras, size, self.spec.spacing_mm, anchor_ras=clicks_ras[new[-1]])
        inside = window.contains(clicks_ras)
        if not any(label == 1 and ok for (_, label), ok in zip(clicks, inside)):
            raise InputError("no positive click inside the model window")

        predictor = self.predictor()
        with self._model_lock:  # the model runs one request at a time
            embedding_key = (image.key, window.key())
            embedding = self.embeddings.get(embedding_key)
            embedding_reused = embedding is not None
            if embedding is None:
                volume = normalise_intensity(sample_window(image.array, image.affine, window))
                embedding = predictor.set_volume(volume)
                self.encoder_runs += 1
                self.embeddings.put(embedding_key, embedding)
            predictor.set_embedding(embedding)
            points = torch.from_numpy(window.to_window(clicks_ras[inside])).float()
            labels = torch.tensor([label for (_, label), ok in zip(clicks, inside) if ok])
            mask_prompt = previous.low_res_logits if keep_window else torch.zeros(1, 1, *(s // 4 for s in self.spec.input_size))
            logits, iou = predictor.predict(points, labels, mask_prompt)
            if ensemble is not None and ensemble.size > 0:
                def decode(point_sets, label_sets):
                    prompts = mask_prompt.expand(len(point_sets), -1, -1, -1, -1)
                    return predictor.predict(point_sets, label_sets, prompts)[0]

                stats = SelfEnsemble(ensemble)({
                    "ensemble_decode": decode, "ensemble_first_logits": logits, "ensemble_points": points.numpy(),
                    "ensemble_labels": labels.numpy(), "ensemble_model_size": size})
                logits, std = stats["ensemble_mean"], stats["ensemble_std"]

        values, block = logits_to_image(logits, window, image.array.shape, image.affine, positive_only=True)
        mask = np.zeros(image.array.shape, dtype=np.uint8, order="F")  # file order of NRRD/NIfTI data
        if values.size:
            mask[block] = values > 0
        if persist:
            self.interactions.put(interaction_key, Interaction(window, clicks, logits))
        uncertainty = None
        if ensemble is not None and ensemble.size > 0:
            std_values, std_block = logits_to_image(std, window, image.array.shape, image.affine)
            uncertainty = np.zeros(image.array.shape, dtype=np.float32, order="F")
            uncertainty[std_block] = np.where(np.isfinite(std_values), std_values, 0)
        info = {
            "model": self.spec.name,
            "window_reused": bool(keep_window),
            "embedding_reused": embedding_reused,
            "window_affine": np.round(window.affine, 6).tolist(),
            "window_size": window.size,
            "clicks_used": int(inside.sum()),
            "clicks_outside_window": int((~inside).sum()),
            "predicted_iou": float(iou.reshape(-1)[0]),
            "voxels": int(mask.sum()),
        }
        if uncertainty is not None:
            info.update(uncertainty_summary(uncertainty, mask, image.affine))
        return ClickResult(mask, image.affine, window, info, uncertainty)


def uncertainty_summary(uncertainty: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> Dict:
    """Summary numbers and a suggested next click: the most uncertain voxel within one voxel of the
    mask's boundary (or anywhere, for an empty mask)."""
    from scipy import ndimage

    boundary = mask.astype(bool) ^ ndimage.binary_erosion(mask.astype(bool))
    band = ndimage.binary_dilation(boundary) if boundary.any() else np.ones_like(boundary)
    candidates = np.where(band, uncertainty, -1.0)
    suggestion = np.unravel_index(int(np.argmax(candidates)), uncertainty.shape)
    return {
        "uncertainty_max": float(uncertainty.max()),
        "uncertainty_mean_on_boundary": float(uncertainty[boundary].mean()) if boundary.any() else 0.0,
        "suggested_click": [int(c) for c in suggestion],
        "suggested_click_uncertainty": float(uncertainty[suggestion]),
    }


def validate_clicks(foreground, background, shape, need_positive: bool = True) -> List[Tuple[Tuple[int, int, int], int]]:
    """Integer voxel indices inside the image, positives first as the clients send them."""
    clicks = []
    for points, label in ((foreground or [], 1), (background or [], 0)):
        for point in points:
            try:
                index = tuple(int(round(float(c))) for c in point)
            except (TypeError, ValueError):
                raise InputError(f"a click must be three voxel indices [i, j, k], got {point!r}") from None
            if len(index) != 3:
                raise InputError(f"a click must be three voxel indices [i, j, k], got {point!r}")
            if not all(0 <= c < n for c, n in zip(index, shape)):
                raise InputError(f"click {list(index)} lies outside the image of size {list(shape)}")
            clicks.append((index, label))
    if need_positive and not any(label == 1 for _, label in clicks):
        raise InputError("at least one foreground (positive) click is needed")
    return clicks
