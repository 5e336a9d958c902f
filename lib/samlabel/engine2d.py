"""The 2D models driven slice by slice: MedSAM (box prompts, or points with its point-prompt
checkpoint) and SAM-Med2D (point prompts), and their propagation to 3D.

A slice is the stored array's third axis at index k, as both front ends assume; in the model
frame x is the first array axis (i, the column) and y the second (j, the row). Each model gets
its own official preprocessing (predictor2d); the mask comes back on slice k of a volume with
the image's own grid.
"""

import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .cache import LRUCache
from .engine import ClickEngine, Interaction
from .errors import InputError
from .images import StoredImage
from .predictor2d import SamPredictor2D, intensity_window, to_uint8_range
from .request import ClickRequest

BOX_MARGIN_PIXELS = 10  # in the model frame of 1024: about MedSAM's training box jitter (0-20 px)


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


def resize_to_slice(maps: np.ndarray, columns: int, rows: int) -> np.ndarray:
    """(S, L, L) low-res maps bilinearly resized to (S, columns, rows), array order."""
    resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None], size=(rows, columns),
                            mode="bilinear", align_corners=False)
    return resized[0].transpose(1, 2).numpy()


# The official inference code's masks, one function per model family (registry field
# `mask_postprocess`): low-res logits (S, L, L) -> masks (S, columns, rows) on the slice's own
# pixels. Each map goes through torch on its own, as a (1, 1, L, L) tensor, as there.


def _each_map(logits: np.ndarray, mapping) -> np.ndarray:
    maps = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    return np.stack([mapping(maps[s][None, None])[0, 0].numpy().T for s in range(len(maps))])


def medsam_masks(logits: np.ndarray, columns: int, rows: int, input_size: int) -> np.ndarray:
    """MedSAM (MedSAM_Inference.py's medsam_inference, the point-prompt tutorial's infer):
    the sigmoid of the low-res logits, bilinear (align_corners=False) to the slice, > 0.5."""
    def mapping(low_res):
        return F.interpolate(torch.sigmoid(low_res), size=(rows, columns), mode="bilinear", align_corners=False) > 0.5
    return _each_map(logits, mapping)


def sam_med2d_masks(logits: np.ndarray, columns: int, rows: int, input_size: int) -> np.ndarray:
    """SAM-Med2D (SammedPredictor.postprocess_masks, then predict_torch): the low-res logits
    bilinear to the model input (input_size^2), then bilinear to the slice, then sigmoid > 0.5."""
    def mapping(low_res):
        at_input = F.interpolate(low_res, size=(input_size, input_size), mode="bilinear", align_corners=False)
        return torch.sigmoid(F.interpolate(at_input, size=(rows, columns), mode="bilinear", align_corners=False)) > 0.5
    return _each_map(logits, mapping)


@dataclass(frozen=True)
class SliceGeometry:
    """Where a 2D model's low-res maps (1, S, L, L) lie: channel s on slice slices[s]; masks maps
    logits (S, L, L) to masks (S, columns, rows) the model's official way."""

    slices: Tuple[int, ...]
    image_shape: Tuple[int, int, int]
    masks: Callable[[np.ndarray, int, int], np.ndarray]

    def mask(self, logits: np.ndarray) -> np.ndarray:
        mask = np.zeros(self.image_shape, dtype=np.uint8, order="F")
        mask[:, :, list(self.slices)] = self.masks(logits[0], *self.image_shape[:2]).transpose(1, 2, 0)
        return mask

    def field(self, values: np.ndarray) -> np.ndarray:
        volume = np.zeros(self.image_shape, dtype=np.float32, order="F")
        volume[:, :, list(self.slices)] = resize_to_slice(values[0], *self.image_shape[:2]).transpose(1, 2, 0)
        return volume


PREFETCH_ENCODE_SECONDS = 0.5  # a slice encoding started on open delays a click arriving meanwhile by at most this


class SliceSegmenter(ClickEngine):
    dimension = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.intensity_windows = LRUCache(256)  # image key -> its 0-255 window
        self.encode_seconds: Optional[float] = None  # the latest slice encoding's duration

    def prefetch_slice(self, image_path: str) -> Optional[str]:
        """On opening an image: encode its middle slice, the likely first one, where that is cheap
        (on CUDA, or where the latest encoding took at most PREFETCH_ENCODE_SECONDS; MedSAM's 1024^2
        encoder on a CPU is not). Returns what it did, or None."""
        cheap = self.device.startswith("cuda") or (self.encode_seconds is not None and
                                                   self.encode_seconds <= PREFETCH_ENCODE_SECONDS)
        if not cheap:
            return None
        image = self.images.get(image_path)
        middle = image.array.shape[2] // 2
        predictor = self.predictor()
        with self._model_lock:
            runs = self.encoder_runs
            self._embedding(predictor, image, middle)
        return f"{self.spec.name} slice {middle} encoded" if self.encoder_runs > runs else None

    def make_predictor(self, model) -> SamPredictor2D:
        return SamPredictor2D(model, self.spec.preprocess, self.dtype)

    def slice_masks(self, logits: np.ndarray, columns: int, rows: int) -> np.ndarray:
        """Low-res logits (S, L, L) -> masks (S, columns, rows), the model's official way."""
        return self._masks()(logits, columns, rows)

    def _masks(self) -> Callable[[np.ndarray, int, int], np.ndarray]:
        return partial(self.spec.mask_postprocess, input_size=self.spec.input_size[0])

    def predict(self, image_path: str, request: ClickRequest) -> dict:
        image = self.images.get(image_path)
        takes_box = self.spec.prompt.takes_box
        clicks = request.clicks_in(image.array.shape, need_positive=not (takes_box and request.roi))
        slice_index = self._slice_of(request, clicks, image.array.shape[2])
        columns, rows = image.array.shape[:2]
        scale = np.array([self.spec.input_size[0] / columns, self.spec.input_size[0] / rows])  # (x, y) -> model frame
        positives = np.array([p[:2] for p, label in clicks if label == 1], dtype=np.float64).reshape(-1, 2)
        negatives = np.array([p[:2] for p, label in clicks if label == 0], dtype=np.float64).reshape(-1, 2)
        if takes_box:
            prompts = {"boxes": self._box(request.roi, positives, negatives, scale)[None]}
        else:
            prompts = {"points": np.concatenate([positives, negatives])[None] * scale,
                       "labels": np.array([[1] * len(positives) + [0] * len(negatives)])}
        previous = self.previous(request, image_path, image, clicks)
        previous_logits = previous.low_res_logits if previous is not None and previous.place == slice_index else None

        predictor = self.predictor()
        with self._model_lock:
            runs = self.encoder_runs
            predictor.set_embedding(self._embedding(predictor, image, slice_index))
            logits, _ = self.decode(predictor, prompts, previous_logits, request.ensemble_size)
        info = {"model": self.spec.name, "slice": slice_index, "interaction_continued": previous is not None,
                "embedding_reused": self.encoder_runs == runs}
        return {"logits": logits, "geometry": SliceGeometry((slice_index,), image.array.shape, self._masks()),
                "affine": image.affine, "result": info, "click_request": request, "image_path": image_path,
                "interaction": Interaction(image.key, clicks, slice_index)}

    def propagate(self, image_path: str, request: ClickRequest, seconds: float = 60.0) -> dict:
        """Segment the clicked slice, then walk outwards slice by slice, each prompted by its
        neighbour's mask (MedSAM: its box; SAM-Med2D: its deepest pixel and its mask), until the
        structure ends. A direction stops at the first slice whose mask is empty, overlaps less
        than half of the neighbour's mask (it jumped to something else), or is under 5 % of the
        clicked slice's area (the structure tapers out); everything stops after `seconds`.
        Returns predict's data with the logits of every covered slice; nothing is committed."""
        data = self.predict(image_path, replace(request, ensemble_size=0))
        image, start = self.images.get(image_path), data["result"]["slice"]
        columns, rows, depth = image.array.shape
        scale = np.array([self.spec.input_size[0] / columns, self.spec.input_size[0] / rows])
        start_logits = data["logits"][:1]
        start_mask = self.slice_masks(start_logits[0], columns, rows)[0]
        start_area = int(start_mask.sum())
        covered = {start: start_logits}
        deadline = time.monotonic() + seconds
        stopped = "structure ended"
        predictor = self.predictor()
        for direction in (1, -1):
            neighbour, neighbour_logits, k = start_mask, start_logits, start + direction
            while start_area and 0 <= k < depth:
                if time.monotonic() > deadline:
                    stopped = f"time limit of {seconds:g} s"
                    break
                deepest = np.array([np.unravel_index(ndimage.distance_transform_edt(neighbour).argmax(), neighbour.shape)],
                                   dtype=np.float64) * scale
                if self.spec.prompt.takes_box:
                    columns_hit, rows_hit = np.nonzero(neighbour)
                    corners = np.array([[columns_hit.min(), rows_hit.min()], [columns_hit.max(), rows_hit.max()]], dtype=np.float64)
                    prompts = {"boxes": box_from_clicks(corners, np.zeros((0, 2)), scale)[None]}
                else:
                    prompts = {"points": deepest[None], "labels": np.ones((1, 1), np.int64)}
                with self._model_lock:
                    predictor.set_embedding(self._embedding(predictor, image, k))
                    logits, _ = self.spec.prompt.decode(predictor, prompts, neighbour_logits)
                current = self.slice_masks(logits[0], columns, rows)[0]
                area = int(current.sum())
                if area == 0 or (current & neighbour).sum() < 0.5 * min(area, neighbour.sum()) or area < 0.05 * start_area:
                    break
                covered[k] = logits
                neighbour, neighbour_logits, k = current, logits, k + direction
        slices = tuple(sorted(covered))
        data["logits"] = np.concatenate([covered[k] for k in slices], axis=1)  # (1, S, L, L)
        data["geometry"] = SliceGeometry(slices, image.array.shape, self._masks())
        data["result"].update({"slices": [slices[0], slices[-1]], "stopped": stopped})
        data["interaction"] = None
        return data

    def _slice_of(self, request: ClickRequest, clicks, depth: int) -> int:
        slices = {point[2] for point, _ in clicks}
        slice_index = request.slice_index
        if slice_index is None:
            if len(slices) != 1:
                raise InputError("a 2D model needs the clicks on one slice, or a `slice`; got clicks on slices "
                                 f"{sorted(slices) or 'none'}")
            slice_index = slices.pop()
        if not 0 <= slice_index < depth:
            raise InputError(f"slice {slice_index} is outside the image's {depth} slices")
        if slices - {slice_index}:
            raise InputError(f"clicks on slices {sorted(slices)} do not all lie on slice {slice_index}")
        return slice_index

    def _embedding(self, predictor: SamPredictor2D, image: StoredImage, slice_index: int):
        key = (image.key, slice_index)
        embedding = self.embeddings.get(key)
        if embedding is None:
            window = self.intensity_windows.get(image.key)
            if window is None:
                window = intensity_window(image.array)
                self.intensity_windows.put(image.key, window)
            started = time.perf_counter()
            embedding = predictor.set_image(to_uint8_range(image.array[:, :, slice_index].T, window))
            self.encode_seconds = time.perf_counter() - started
            self.encoder_runs += 1
            self.embeddings.put(key, embedding)
        return embedding

    def _box(self, roi: Optional[Sequence[float]], positives, negatives, scale) -> np.ndarray:
        """The box in the model frame: from Slicer's ROI [i_a, i_b, j_a, j_b, k_a, k_b] (any
        order), else from the clicks."""
        if roi:
            i_a, i_b, j_a, j_b = roi[:4]
            low, high = np.array([min(i_a, i_b), min(j_a, j_b)]), np.array([max(i_a, i_b), max(j_a, j_b)])
            if np.any(high - low < 1):
                raise InputError(f"the box {list(roi)[:4]} is empty")
            return np.concatenate([low * scale, high * scale])
        if len(positives) == 0:
            raise InputError(f"{self.spec.title} needs a box (`roi`) or at least one positive click on the slice")
        return box_from_clicks(positives, negatives, scale)
