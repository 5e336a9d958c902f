"""The 2D models driven slice by slice: MedSAM (box prompts, or points with its point-prompt
checkpoint) and SAM-Med2D (point prompts).

A slice is the stored array's third axis at index k, as both front ends assume; in the model
frame x is the first array axis (i, the column) and y the second (j, the row), so the slice
image is array[:, :, k].T. Each model gets its own official preprocessing; the mask comes back
on slice k of a volume with the image's own grid.
"""

import threading
import time
from dataclasses import dataclass
from typing import Dict, Hashable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .checkpoint import load_model
from .engine import ClickResult, ImageCache, InputError, LRUCache, StoredImage, uncertainty_summary, validate_clicks
from .registry import ModelSpec
from .uncertainty import EnsembleConfig, SelfEnsemble, ensemble_statistics, jittered_boxes

SAM_PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53])
SAM_PIXEL_STD = torch.tensor([58.395, 57.12, 57.375])
BOX_MARGIN_PIXELS = 10  # in the 1024 frame: about MedSAM's training box jitter (0-20 px)


def intensity_window(image: StoredImage) -> Tuple[float, float]:
    """MedSAM's mapping to 0-255: CT (any value <= -500) window level 40 / width 400; other
    modalities the 0.5-99.5 percentiles of the non-zero voxels."""
    array = image.array
    if array.min() <= -500:
        return -160.0, 240.0
    nonzero = array[array != 0]
    if nonzero.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(nonzero, [0.5, 99.5])
    if high - low < 1e-6:  # (nearly) constant non-zero values: the full range instead
        low, high = min(0.0, float(array.min())), float(array.max())
    return float(low), float(max(high, low + 1e-6))


def to_uint8_range(slice_2d: np.ndarray, window: Tuple[float, float], keep_zero: bool) -> torch.Tensor:
    low, high = window
    scaled = (np.clip(slice_2d.astype(np.float32), low, high) - low) / (high - low) * 255.0
    if keep_zero:  # MR: background stays 0
        scaled[slice_2d == 0] = 0
    return torch.from_numpy(scaled)


def preprocess_medsam(slice_255: torch.Tensor) -> torch.Tensor:
    """3 channels, bicubic resize to 1024^2 (official: skimage order-3 with anti-aliasing), uint8,
    then min-max to [0, 1]."""
    resized = F.interpolate(slice_255[None, None], size=(1024, 1024), mode="bicubic", antialias=True, align_corners=False)
    resized = resized.clamp(0, 255).round()
    resized = (resized - resized.min()) / (resized.max() - resized.min()).clamp(min=1e-8)
    return resized.expand(1, 3, -1, -1).contiguous()


def preprocess_sam_med2d(slice_255: torch.Tensor) -> torch.Tensor:
    """SAM's per-channel mean/std on the 0-255 image, then a nearest resize to 256^2."""
    normalised = (slice_255[None] - SAM_PIXEL_MEAN[:, None, None]) / SAM_PIXEL_STD[:, None, None]
    return F.interpolate(normalised[None], size=(256, 256), mode="nearest")


PREPROCESS = {"medsam": preprocess_medsam, "sam_med2d": preprocess_sam_med2d}


def box_from_clicks(positives: np.ndarray, negatives: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """MedSAM's box when the user gives clicks, in the model frame: the positive clicks' bounding
    box grown by max(10 px, 10 % of its size) per side; each negative click inside the box pulls
    the nearest side in past it (negatives exclude)."""
    low, high = positives.min(0) * scale, positives.max(0) * scale
    margin = np.maximum(BOX_MARGIN_PIXELS, 0.1 * (high - low))
    low, high = low - margin, high + margin
    for negative in negatives * scale:
        if np.all((negative > low) & (negative < high)):
            gaps = np.concatenate([negative - low, high - negative])  # distance to left, top, right, bottom
            side = int(np.argmin(gaps))
            if side < 2:
                low[side] = negative[side] + 1
            else:
                high[side - 2] = negative[side - 2] - 1
    return np.concatenate([low, high])


def slice_mask(logits: torch.Tensor, columns: int, rows: int) -> np.ndarray:
    """The official output: sigmoid of the low-res logits, bilinear to the slice's own pixels,
    > 0.5; returned in array order (columns, rows)."""
    probabilities = F.interpolate(torch.sigmoid(logits), size=(rows, columns), mode="bilinear", align_corners=False)
    return (probabilities[0, 0] > 0.5).numpy().T


@dataclass
class SliceState:
    slice_index: int
    low_res_logits: torch.Tensor


class SliceSegmenter:
    """One 2D model served to many users: lazy load, per-slice embedding cache, per-user state."""

    def __init__(self, spec: ModelSpec, checkpoint, images: ImageCache, device: str = "cpu", embeddings: int = 64,
                 interactions: int = 256):
        self.spec, self.checkpoint, self.images, self.device = spec, checkpoint, images, device
        self.embeddings = LRUCache(embeddings)
        self.interactions = LRUCache(interactions)
        self.windows = LRUCache(256)  # image key -> its 0-255 intensity window
        self.encoder_runs = 0
        self.latest: Dict = {}  # (client_id, image) -> the latest interaction's (key, foreground, background)
        self._model = None
        self._lock = threading.Lock()

    def model(self):
        with self._lock:
            if self._model is None:
                self._model = load_model(self.spec, self.checkpoint, self.device)
            return self._model

    def segment(self, image_path: str, foreground: Sequence, background: Sequence, interaction_key: Hashable,
                slice_index: Optional[int] = None, roi: Optional[Sequence] = None, reset: bool = False,
                ensemble: Optional[EnsembleConfig] = None, persist: bool = True):
        image = self.images.get(image_path)
        clicks = validate_clicks(foreground, background, image.array.shape, need_positive=roi is None)
        slices = {point[2] for point, _ in clicks}
        if slice_index is None:
            if len(slices) != 1:
                raise InputError("a 2D model needs the clicks on one slice, or a `slice`; got clicks on slices "
                                 f"{sorted(slices) or 'none'}")
            slice_index = slices.pop()
        if not 0 <= int(slice_index) < image.array.shape[2]:
            raise InputError(f"slice {slice_index} is outside the image's {image.array.shape[2]} slices")
        slice_index = int(slice_index)
        if slices - {slice_index}:
            raise InputError(f"clicks on slices {sorted(slices)} do not all lie on slice {slice_index}")

        columns, rows = image.array.shape[:2]
        size = self.spec.input_size[0]
        scale = np.array([size / columns, size / rows])  # (x, y) pixel -> model frame
        positives = np.array([p[:2] for p, label in clicks if label == 1], dtype=np.float64).reshape(-1, 2)
        negatives = np.array([p[:2] for p, label in clicks if label == 0], dtype=np.float64).reshape(-1, 2)

        model = self.model()
        with self._lock:
            runs = self.encoder_runs
            embedding = self._embedding(model, image, slice_index)
            reused = self.encoder_runs == runs
            previous = None if reset else self.interactions.get(interaction_key)
            if previous is not None and previous.slice_index != slice_index:
                previous = None
            box = self._box(roi, positives, negatives, scale) if self.spec.prompt == "box" else None
            previous_logits = previous.low_res_logits if previous is not None else None
            logits = self._decode(model, embedding, positives * scale, negatives * scale, box, previous_logits)
            std = None
            if ensemble is not None and ensemble.size > 0:  # one batched decoder call for all members
                if box is not None:
                    members = self._decode(model, embedding, None, None, jittered_boxes(box, ensemble), None)
                    logits, std = ensemble_statistics(members)
                else:
                    stats = SelfEnsemble(ensemble)({
                        "ensemble_decode": lambda p, l: self._decode(model, embedding, p, l, None, previous_logits),
                        "ensemble_first_logits": logits, "ensemble_points": np.concatenate([positives, negatives]) * scale,
                        "ensemble_labels": np.array([1] * len(positives) + [0] * len(negatives)),
                        "ensemble_model_size": size, "ensemble_xy": True})
                    logits, std = stats["ensemble_mean"], stats["ensemble_std"]
        if persist:
            self.interactions.put(interaction_key, SliceState(slice_index, logits))
        mask = np.zeros(image.array.shape, dtype=np.uint8, order="F")
        mask[:, :, slice_index] = slice_mask(logits, columns, rows)
        info = {"model": self.spec.name, "slice": slice_index, "embedding_reused": reused, "voxels": int(mask.sum())}
        uncertainty = None
        if std is not None:
            uncertainty = np.zeros(image.array.shape, dtype=np.float32, order="F")
            uncertainty[:, :, slice_index] = F.interpolate(std, size=(rows, columns), mode="bilinear",
                                                           align_corners=False)[0, 0].numpy().T
            info.update(uncertainty_summary(uncertainty, mask, image.affine))
        return ClickResult(mask, image.affine, None, info, uncertainty)

    def propagate(self, image_path: str, foreground: Sequence, background: Sequence, interaction_key: Hashable,
                  slice_index: Optional[int] = None, roi: Optional[Sequence] = None, reset: bool = False,
                  seconds: float = 60.0) -> ClickResult:
        """Segment the clicked slice, then walk outwards slice by slice, each prompted by its
        neighbour's mask (MedSAM: its box; SAM-Med2D: its deepest pixel and its mask), until the
        structure ends. A direction stops at the first slice whose mask is empty, overlaps less
        than half of the neighbour's mask (it jumped to something else), or is under 5 % of the
        clicked slice's area (the structure tapers out); everything stops after `seconds`."""
        result = self.segment(image_path, foreground, background, interaction_key, slice_index, roi, reset)
        image, start = self.images.get(image_path), result.info["slice"]
        columns, rows, depth = image.array.shape
        size = self.spec.input_size[0]
        scale = np.array([size / columns, size / rows])
        start_area = int(result.mask[:, :, start].sum())
        deadline = time.monotonic() + seconds
        stopped, covered = "structure ended", [start, start]
        model = self.model()
        for direction in (1, -1):
            neighbour, neighbour_logits = result.mask[:, :, start].astype(bool), self.interactions.get(interaction_key).low_res_logits
            k = start + direction
            while start_area and 0 <= k < depth:
                if time.monotonic() > deadline:
                    stopped = f"time limit of {seconds:.0f} s"
                    break
                with self._lock:
                    embedding = self._embedding(model, image, k)
                    deepest = np.array([np.unravel_index(ndimage.distance_transform_edt(neighbour).argmax(), neighbour.shape)],
                                       dtype=np.float64)
                    columns_hit, rows_hit = np.nonzero(neighbour)
                    corners = np.array([[columns_hit.min(), rows_hit.min()], [columns_hit.max(), rows_hit.max()]], dtype=np.float64)
                    box = box_from_clicks(corners, np.zeros((0, 2)), scale) if self.spec.prompt == "box" else None
                    logits = self._decode(model, embedding, deepest * scale, np.zeros((0, 2)), box, neighbour_logits)
                current = slice_mask(logits, columns, rows)
                area = int(current.sum())
                if area == 0 or (current & neighbour).sum() < 0.5 * min(area, neighbour.sum()) or area < 0.05 * start_area:
                    break
                result.mask[:, :, k] = current
                covered[direction > 0] = k
                neighbour, neighbour_logits, k = current, logits, k + direction
        result.info.update({"voxels": int(result.mask.sum()), "slices": [min(covered), max(covered)], "stopped": stopped})
        return result

    @torch.inference_mode()
    def _decode(self, model, embedding, positives, negatives, box, previous_logits) -> torch.Tensor:
        """Low-res logits (B, 1, L, L) from prompts in the model frame: positive and negative points
        (arrays), or ready prompt sets (tensors (B, P, 2) points and (B, P) labels), or a box
        (array (4,) or tensor (B, 4))."""
        dense_pe = model.prompt_encoder.get_dense_pe()
        if self.spec.prompt == "box":  # MedSAM: a box, no points, no mask (as trained)
            boxes = box if torch.is_tensor(box) else torch.from_numpy(box).float()[None]
            sparse, dense = model.prompt_encoder(None, boxes, None)
            return model.mask_decoder(embedding, dense_pe, sparse, dense, False)[0]
        if torch.is_tensor(positives):
            points, labels = positives, negatives
        else:
            points = torch.from_numpy(np.concatenate([positives, negatives])).float()[None]
            labels = torch.tensor([[1] * len(positives) + [0] * len(negatives)])
        if self.spec.prompt == "point":  # MedSAM's point-prompt decoder: points only, one mask (as trained)
            sparse, dense = model.prompt_encoder((points, labels), None, None)
            return model.mask_decoder(embedding, dense_pe, sparse, dense, False)[0]
        # SAM-Med2D: points, the previous mask fed back as probabilities, the best of 3 masks
        mask_input = torch.sigmoid(previous_logits).expand(len(points), -1, -1, -1) if previous_logits is not None else None
        sparse, dense = model.prompt_encoder((points, labels), None, mask_input)
        all_logits, iou = model.mask_decoder(embedding, dense_pe, sparse, dense, True)
        best = iou.argmax(1)  # per prompt set
        return all_logits[torch.arange(len(best)), best][:, None]

    def _embedding(self, model, image: StoredImage, slice_index: int) -> torch.Tensor:
        key = (image.key, slice_index)
        embedding = self.embeddings.get(key)
        if embedding is None:
            if self.windows.get(image.key) is None:
                self.windows.put(image.key, intensity_window(image))
            low, high = self.windows.get(image.key)
            slice_255 = to_uint8_range(image.array[:, :, slice_index].T, (low, high), keep_zero=(low, high) != (-160.0, 240.0))
            with torch.inference_mode():
                embedding = model.image_encoder(PREPROCESS[self.spec.preprocess](slice_255).to(self.device))
            self.encoder_runs += 1
            self.embeddings.put(key, embedding)
        return embedding

    @staticmethod
    def _box(roi, positives, negatives, scale) -> np.ndarray:
        """The box in the model frame: from Slicer's ROI [i_a, i_b, j_a, j_b, k_a, k_b] (any
        order), else from the clicks."""
        if roi:
            i_a, i_b, j_a, j_b = (float(v) for v in list(roi)[:4])
            low, high = np.array([min(i_a, i_b), min(j_a, j_b)]), np.array([max(i_a, i_b), max(j_a, j_b)])
            if np.any(high - low < 1):
                raise InputError(f"the box {list(roi)[:4]} is empty")
            return np.concatenate([low * scale, high * scale])
        if len(positives) == 0:
            raise InputError("MedSAM needs a box (`roi`) or at least one positive click on the slice")
        return box_from_clicks(positives, negatives, scale)
