"""SAM3D's automatic segmentation (no prompts) around any encode/decode pair: the official inference
pipeline of UARK-AICV/SAM3D @ 4f54b7c (nnU-Net v1 by way of nnFormer), step by step.

Official path (Trainer_*.preprocess_patient -> preprocessing/cropping.py, preprocessing.py
GenericPreprocessor.preprocess_test_case; predict_preprocessed_data_return_seg_and_softmax ->
network_architecture/neural_network.py; inference/segmentation_export.py), and what we do:

1. SimpleITK reads the file: the voxel array in (z, y, x), i.e. the stored (i, j, k) reversed, as
   float32, and the spacing from the header, reversed alike. Direction cosines and origin are never
   used: the network sees the voxel grid as stored, whatever its orientation. We take the array and
   affine the app loaded (MONAI: (i, j, k), RAS), reverse the axes, and take the spacing as the
   affine's column norms (the header's pixdim up to float32 rounding: new shapes only differ where
   spacing ratio x size lies within ~1e-6 of a half).
2. Crop to the box of the voxels that are nonzero in any modality (holes filled); outside the
   filled mask is "-1" for use_mask_for_norm.
3. transpose_forward, then resample_patient to the stage's current_spacing: new shape
   round(spacing / target x shape) (numpy's round); when max/min spacing > 3 (the image's, else the
   target's) and one axis alone holds the maximum, each slice across that axis is resized in-plane
   (order 3) and the axis itself by nearest neighbour (order 0); otherwise the volume in 3-D (order
   3). The mask goes the same way with order 1 (batchgenerators' resize_segmentation, per label).
   The resizing is scikit-image 0.18.1's `resize(mode='edge', anti_aliasing=False, clip=True)`, the
   version SAM3D's requirements pin: a 2-D image, or a 3-D one whose last axis keeps its size, goes
   through skimage's own 2-D warp channel by channel (Catmull-Rom cubic convolution for order 3,
   bilinear for 1); any other 3-D one through scipy's map_coordinates (cubic B-spline, mode
   'nearest'); samples at (o + 0.5) * in / out - 0.5, edge-extended, clipped to the input's range.
   (skimage >= 0.19 would use the B-spline in-plane too: we follow the pinned version.)
4. Normalise each modality in float32 ("CT": clip to percentile_00_5 / percentile_99_5, minus mean,
   over sd; "CT2": clip, then mean and sd of the voxels strictly inside the percentiles; any other:
   z-score over the mask (all voxels without use_mask_for_norm), + 1e-8 on the sd, 0 outside). The
   statistics are cast to float32 first: the official code ran on NumPy 1.20, whose value-based
   casting kept such arithmetic in float32.
5. Sliding window (_internal_predict_3D_3Dconv_tiled): pad to at least the patch (pad_nd_image:
   zeros, floor(diff / 2) before); window starts per axis from _compute_steps_for_sliding_window
   with step 0.5 (`window_starts`); each window's softmax (averaged over the mirrored copies with
   mirroring) times the Gaussian of _get_gaussian(patch, 1/8) (`gaussian_importance`; ones when
   there is one window) summed, divided by the summed weights; padding cut off.
6. transpose_backward; the class probabilities resampled to the cropped shape like the data (order
   1 in-plane, order 0 along a separate axis; that axis from the image's spacing, else from the
   target spacing in the network's axis order, applied in the image's order: an upstream quirk we
   keep), argmax, un-cropped into zeros, uint8 (save_segmentation_nifti_from_softmax).

Where we differ, and why:
- Not MONAI's sliding_window_inference: its scan starts windows at multiples of int(P * (1 -
  overlap)) and clamps the last (length 110, patch 64: 0, 32, 46), nnU-Net spreads them evenly
  (0, 23, 46), and the SAM encoder's features depend on the exact in-plane crop, so the windows
  must be nnU-Net's. MONAI's Gaussian with sigma_scale 1/8 has nnU-Net's sigma but is centred at
  (n - 1) / 2 instead of n // 2 and floored at 1e-3, so we build nnU-Net's map as well.
- Encoder features are computed once per (in-plane window position, slice, in-plane flips) and
  reused by every window along depth (and by later runs through a FeatureCache): the encoder sees
  each slice on its own, so a window's features are its slices' features stacked, exactly what the
  official per-window forward computes. A depth flip reverses that stack; in-plane flips change
  the encoder's input and get features of their own. Windows are visited in-plane position by
  position (nnU-Net: depth-major): the same windows, inputs and weights, summed in another order
  (float32 rounding only).
- The class probabilities are resampled back one output slice at a time on the device, in
  float64 (the official: the whole softmax in float64 on the host) and cast to float32 before the
  argmax as the official does; same values up to rounding, without a full-resolution softmax.
- Precision is encode's and decode's own (predict.py runs the network under autocast by default);
  the softmax is taken in float32, as autocast does.
"""

import itertools
from dataclasses import dataclass
from typing import Callable, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .cache import LRUCache

Encode = Callable[[torch.Tensor], torch.Tensor]  # (1, M, n, H, W) -> (1, F, n, H/16, W/16), slice by slice
Decode = Callable[[torch.Tensor], torch.Tensor]  # (1, F, D, H/16, W/16) -> logits (1, C, D, H, W)

ANISOTROPY_THRESHOLD = 3  # configuration.py RESAMPLING_SEPARATE_Z_ANISO_THRESHOLD
STEP_SIZE = 0.5  # the step of predict.py and the trainers' validate
SIGMA_SCALE = 1 / 8  # neural_network.py: _get_gaussian(patch_size, sigma_scale=1. / 8)
MIRROR_AXES = (0, 1, 2)  # default_3D_augmentation_params['mirror_axes'], which the SAM3D trainers keep
CT_SCHEMES = ("CT", "CT2")  # the schemes that read the dataset's intensity properties
INTENSITY_KEYS = ("mean", "sd", "percentile_00_5", "percentile_99_5")


# ---- plans --------------------------------------------------------------------------------------
class PlansError(ValueError):
    """The plans lack, or garble, something the pipeline needs; the message is one line."""


@dataclass(frozen=True)
class IntensityProperties:
    """dataset_properties['intensityproperties'][modality]: the training foreground's statistics."""

    mean: float
    sd: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass(frozen=True)
class Plans:
    """What inference reads from nnU-Net v1 plans (the `plans` of SAM3D's .model.pkl). Spacing and
    patch are in the network's axis order (after transpose_forward); num_classes counts background."""

    target_spacing: Tuple[float, float, float]
    patch_size: Tuple[int, int, int]
    num_classes: int
    normalization_schemes: Tuple[str, ...]  # per modality
    use_mask_for_norm: Tuple[bool, ...]
    intensity_properties: Tuple[Optional[IntensityProperties], ...]  # None where the scheme reads none
    transpose_forward: Tuple[int, int, int]
    transpose_backward: Tuple[int, int, int]
    export_force_separate_z: Optional[bool] = None  # plans['segmentation_export_params'], where present
    export_order_z: int = 0

    @property
    def num_modalities(self) -> int:
        return len(self.normalization_schemes)

    @classmethod
    def from_dict(cls, plans: Mapping, stage: Optional[Hashable] = None) -> "Plans":
        """From the plans dict (or the whole .model.pkl dict holding it under 'plans'); stage: a key of
        plans_per_stage, by default the last (3d_fullres, as the SAM3D trainers use)."""
        if isinstance(plans, Mapping) and isinstance(plans.get("plans"), Mapping) and "init" in plans:
            plans = plans["plans"]
        if not isinstance(plans, Mapping):
            raise PlansError(f"SAM3D plans must be a dict, got {type(plans).__name__}")
        stages = _entry(plans, "plans_per_stage")
        if not isinstance(stages, Mapping) or not stages:
            raise PlansError("SAM3D plans: 'plans_per_stage' holds no stage")
        stage = list(stages)[-1] if stage is None else stage
        spacing, patch = (_numbers(_entry(plans, "plans_per_stage", stage, key),
                                   f"plans_per_stage[{stage!r}][{key!r}]", kind)
                          for key, kind in (("current_spacing", float), ("patch_size", int)))
        modalities = _count(_entry(plans, "num_modalities"), "'num_modalities'")
        schemes = tuple(str(_per_modality(plans, "normalization_schemes", m)) for m in range(modalities))
        use_mask = tuple(bool(_per_modality(plans, "use_mask_for_norm", m)) for m in range(modalities))
        intensity = tuple(_intensity(plans, m) if scheme in CT_SCHEMES else None for m, scheme in enumerate(schemes))
        classes = _count(_entry(plans, "num_classes"), "'num_classes'") + 1
        if classes > 256:
            raise PlansError(f"SAM3D plans: {classes - 1} classes do not fit a uint8 label map")
        forward, backward = _transposes(plans)
        export = plans.get("segmentation_export_params") or {}
        force_separate_z = export.get("force_separate_z")
        order, order_z = export.get("interpolation_order", 1), export.get("interpolation_order_z", 0)
        if order != 1 or order_z not in (0, 1):
            raise PlansError(f"SAM3D plans: segmentation_export_params orders {order} / {order_z} are not supported "
                             "(interpolation_order 1, interpolation_order_z 0 or 1)")
        return cls(spacing, patch, classes, schemes, use_mask, intensity, forward, backward,
                   None if force_separate_z is None else bool(force_separate_z), int(order_z))


def _entry(plans: Mapping, *keys):
    value, path = plans, ""
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            raise PlansError(f"SAM3D plans: missing {path}[{key!r}]" if path else f"SAM3D plans: missing {key!r}")
        value, path = value[key], f"{path}[{key!r}]" if path else repr(key)
    return value


def _numbers(value, name: str, kind) -> tuple:
    try:
        numbers = tuple(kind(v) for v in np.asarray(value).reshape(-1))
    except (TypeError, ValueError):
        numbers = ()
    if value is None or len(numbers) != 3 or not all(np.isfinite(numbers)) or min(numbers) <= 0:
        raise PlansError(f"SAM3D plans: {name} must be 3 positive numbers, got {value!r}")
    return numbers


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PlansError(f"SAM3D plans: {name} must be a positive integer, got {value!r}")
    return int(value)


def _per_modality(plans: Mapping, key: str, modality: int):
    table = _entry(plans, key)
    if not isinstance(table, Mapping) or modality not in table:
        raise PlansError(f"SAM3D plans: {key!r} has no entry for modality {modality} "
                         f"of {plans.get('num_modalities')}")
    return table[modality]


def _intensity(plans: Mapping, modality: int) -> IntensityProperties:
    properties = _entry(plans, "dataset_properties", "intensityproperties", modality)
    where = f"['dataset_properties']['intensityproperties'][{modality}]"
    missing = [key for key in INTENSITY_KEYS if not isinstance(properties, Mapping) or key not in properties]
    if missing:
        raise PlansError(f"SAM3D plans: {where} lacks {', '.join(map(repr, missing))} (CT normalisation needs them)")
    try:
        values = IntensityProperties(*(float(properties[key]) for key in INTENSITY_KEYS))
    except (TypeError, ValueError):
        values = None
    if values is None or not values.sd > 0 or not values.percentile_00_5 <= values.percentile_99_5:
        shown = {key: properties[key] for key in INTENSITY_KEYS}
        raise PlansError(f"SAM3D plans: {where} needs numbers with sd > 0 and percentile_00_5 <= percentile_99_5, "
                         f"got {shown!r}")
    return values


def _transposes(plans: Mapping) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """As Trainer_*.process_plans: [0, 1, 2] both ways when either is missing."""
    forward, backward = plans.get("transpose_forward"), plans.get("transpose_backward")
    if forward is None or backward is None:
        return (0, 1, 2), (0, 1, 2)
    forward, backward = tuple(int(a) for a in forward), tuple(int(a) for a in backward)
    if sorted(forward) != [0, 1, 2] or tuple(forward[a] for a in backward) != (0, 1, 2):
        raise PlansError(f"SAM3D plans: transpose_forward {list(forward)} and transpose_backward {list(backward)} "
                         "are not inverse permutations of (0, 1, 2)")
    return forward, backward


# ---- preprocessing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocessed:
    """The network input and what maps its grid back. `itk` shapes and boxes are in SimpleITK's
    (z, y, x) order: the stored (i, j, k) reversed."""

    data: np.ndarray  # (M, D, H, W) float32: network axis order, target spacing, normalised
    crop: Tuple[slice, slice, slice]  # the nonzero box in the (z, y, x) array
    itk_shape: Tuple[int, int, int]
    itk_spacing: Tuple[float, float, float]

    @property
    def cropped_shape(self) -> Tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.crop)


def preprocess(image: np.ndarray, affine: np.ndarray, plans: Plans) -> Preprocessed:
    """image (i, j, k) or (M, i, j, k) as stored, affine voxel -> RAS mm: the official preprocessing."""
    volumes = np.asarray(image)
    volumes = volumes[None] if volumes.ndim == 3 else volumes
    if volumes.ndim != 4 or volumes.shape[0] != plans.num_modalities:
        raise ValueError(f"the plans take {plans.num_modalities} modalit{'y' if plans.num_modalities == 1 else 'ies'} "
                         f"of 3-D volumes, got an image of shape {tuple(np.shape(image))}")
    data = volumes.transpose(0, 3, 2, 1).astype(np.float32)  # SimpleITK's (z, y, x), float32
    itk_spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)[::-1])
    nonzero = ndimage.binary_fill_holes(np.any(data != 0, axis=0))
    if not nonzero.any():
        raise ValueError("the image is zero everywhere: nothing to segment")
    crop = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(nonzero))
    forward = plans.transpose_forward
    data = data[(slice(None),) + crop].transpose(0, *[a + 1 for a in forward]).copy()
    inside = nonzero[crop].transpose(forward)
    data[np.isnan(data)] = 0

    spacing = np.array(itk_spacing)[list(forward)]
    target = np.array(plans.target_spacing)
    new_shape = tuple(int(n) for n in np.round((spacing / target).astype(float) * np.array(inside.shape)))
    axis = _separate_axis(spacing, target)
    if new_shape != inside.shape:
        data = np.stack([_resample(channel.astype(np.float64), new_shape, 3, axis).astype(np.float32)
                         for channel in data])
        if any(plans.use_mask_for_norm):
            inside = _resample_mask(inside, new_shape, axis)
    for m, channel in enumerate(data):
        data[m] = _normalise(channel, plans.normalization_schemes[m], plans.use_mask_for_norm[m],
                             plans.intensity_properties[m], inside)
    return Preprocessed(data, crop, tuple(nonzero.shape), itk_spacing)


def _anisotropic(spacing) -> bool:
    return np.max(spacing) / np.min(spacing) > ANISOTROPY_THRESHOLD


def _lowres_axes(spacing) -> np.ndarray:
    return np.where(max(spacing) / np.array(spacing) == 1)[0]


def _separate_axis(spacing, target) -> Optional[int]:
    """resample_patient's choice (force_separate_z None): the axis resampled on its own, or None."""
    axes = _lowres_axes(spacing) if _anisotropic(spacing) else _lowres_axes(target) if _anisotropic(target) else None
    return int(axes[0]) if axes is not None and len(axes) == 1 else None


def resample_separately(volume: np.ndarray, shape: Tuple[int, ...], axis: Optional[int],
                        resize: Callable[[np.ndarray, Tuple[int, ...]], np.ndarray]) -> np.ndarray:
    """resample_data_or_seg's scheme around a resize(block, block_shape): the whole volume at once, or with a
    separate `axis`, each slice across it resized in-plane, then nearest neighbour along it."""
    if axis is None:
        return resize(volume, shape)
    in_plane = tuple(n for a, n in enumerate(shape) if a != axis)
    slices = np.stack([resize(s, in_plane) for s in np.moveaxis(volume, axis, 0)], axis=axis)
    if volume.shape[axis] == shape[axis]:
        return slices
    return np.take(slices, _nearest(volume.shape[axis], shape[axis]), axis=axis)


def _resample(volume: np.ndarray, shape: Tuple[int, ...], order: int, axis: Optional[int]) -> np.ndarray:
    """resample_data_or_seg for data (float64 in and out), skimage's resize of this order."""
    return resample_separately(volume, shape, axis, lambda block, block_shape: _skimage_resize(block, block_shape, order))


def _resample_mask(inside: np.ndarray, shape: Tuple[int, ...], axis: Optional[int]) -> np.ndarray:
    """resample_data_or_seg of nnU-Net's nonzero map (-1 outside, 0 inside) with resize_segmentation,
    order 1: each label's indicator resized linearly; -1 written where its indicator reaches 0.5,
    then 0 where 0's does (np.unique's order); order 0 along a separate axis."""
    def labels(block: np.ndarray, block_shape) -> np.ndarray:
        outside_reached = _skimage_resize((~block).astype(np.float64), block_shape, 1) >= 0.5
        inside_reached = _skimage_resize(block.astype(np.float64), block_shape, 1) >= 0.5
        return inside_reached | ~outside_reached

    return resample_separately(inside, shape, axis, labels)


def _skimage_resize(image: np.ndarray, shape: Tuple[int, ...], order: int) -> np.ndarray:
    """scikit-image 0.18.1's resize(image, shape, order, mode='edge', anti_aliasing=False) of a
    float64 2-D or 3-D image, order 1 or 3 (see the module docstring)."""
    if image.ndim == 2 or shape[2] == image.shape[2]:
        resized = image
        for axis in (1, 0):  # skimage's warp: along each row, then down the columns
            resized = _interpolate_axis(resized, axis, shape[axis], cubic=order == 3)
    else:
        resized = ndimage.zoom(image, np.divide(shape, image.shape), order=order, mode="nearest", grid_mode=True)
    return np.clip(resized, image.min(), image.max())


def _interpolate_axis(array: np.ndarray, axis: int, size: int, cubic: bool) -> np.ndarray:
    """Resize one axis by skimage's Catmull-Rom cubic convolution (cubic) or linearly, sampling at
    (o + 0.5) * n / size - 0.5 with the edge values beyond the ends."""
    n = array.shape[axis]
    position = n / size * (np.arange(size) + 0.5) - 0.5
    first = np.floor(position)
    t = position - first
    if cubic:
        offsets, weights = (-1, 0, 1, 2), (0.5 * (-t ** 3 + 2 * t ** 2 - t), 1 - 2.5 * t ** 2 + 1.5 * t ** 3,
                                            0.5 * t + 2 * t ** 2 - 1.5 * t ** 3, 0.5 * (t ** 3 - t ** 2))
    else:
        offsets, weights = (0, 1), (1 - t, t)
    shape = [1] * array.ndim
    shape[axis] = size
    return sum(np.take(array, np.clip(first.astype(int) + offset, 0, n - 1), axis=axis) * weight.reshape(shape)
               for offset, weight in zip(offsets, weights))


def _nearest(n: int, size: int) -> np.ndarray:
    """scipy's order-0 map_coordinates at (o + 0.5) * n / size - 0.5, mode 'nearest': the index
    floor(x + 0.5), clamped."""
    position = float(n) / size * (np.arange(size) + 0.5) - 0.5
    return np.clip(np.floor(position + 0.5).astype(int), 0, n - 1)


def _normalise(channel: np.ndarray, scheme: str, use_mask: bool, properties: Optional[IntensityProperties],
               inside: np.ndarray) -> np.ndarray:
    """GenericPreprocessor.resample_and_normalize's normalisation of one float32 modality."""
    if scheme in CT_SCHEMES:
        low, high = np.float32(properties.percentile_00_5), np.float32(properties.percentile_99_5)
        if scheme == "CT":
            mean, sd = np.float32(properties.mean), np.float32(properties.sd)
            normalised = (np.clip(channel, low, high) - mean) / sd
        else:  # the case's own statistics, over the voxels strictly inside the percentiles
            within = (channel > low) & (channel < high)
            clipped = np.clip(channel, low, high)
            normalised = (clipped - clipped[within].mean()) / clipped[within].std()
        if use_mask:
            normalised[~inside] = 0
        return normalised
    mask = inside if use_mask else np.ones(channel.shape, bool)
    normalised = np.zeros_like(channel)
    values = channel[mask]
    normalised[mask] = (values - values.mean()) / (values.std() + 1e-8)
    return normalised


# ---- the sliding window ---------------------------------------------------------------------------
def padding(shape: Sequence[int], patch: Sequence[int]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(padded shape, zeros before) of the sliding window: at least the patch, floor(diff / 2) before."""
    padded = tuple(max(n, p) for n, p in zip(shape, patch))
    return padded, tuple((q - n) // 2 for q, n in zip(padded, shape))


def window_starts(image_size: Sequence[int], patch_size: Sequence[int],
                  step_size: float = STEP_SIZE) -> List[List[int]]:
    """nnU-Net v1's _compute_steps_for_sliding_window: per axis ceil((L - P) / (P * step)) + 1
    windows, starting at round(k * (L - P) / (count - 1)) (numpy's round, halves to even); L >= P."""
    starts = []
    for length, size in zip(image_size, patch_size):
        count = int(np.ceil((length - size) / (size * step_size))) + 1
        spacing = (length - size) / (count - 1) if count > 1 else 0
        starts.append([int(np.round(spacing * k)) for k in range(count)])
    return starts


def gaussian_importance(patch_size: Sequence[int], device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """nnU-Net v1's _get_gaussian(patch_size, 1/8), float32 on `device`: a unit impulse at n // 2
    blurred by scipy's gaussian_filter (sigma n / 8, truncated at 4 sigma), divided by its maximum;
    i.e. the product over axes of exp(-(x - n // 2)^2 / (2 sigma^2)). Within a patch the truncation
    and the official guard against zeros never act: |x - n // 2| <= n / 2 <= 4 sigma + 0.5, and the
    smallest weight is about e^-24."""
    profiles = [torch.exp(-0.5 * ((torch.arange(n, dtype=torch.float64, device=device) - n // 2)
                                  / (n * SIGMA_SCALE)) ** 2) for n in patch_size]
    return (profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]).float()


class FeatureCache:
    """Encoder features of single slices (tensors as the encoder returned them, on its device), by
    (image key, plans, in-plane window start, in-plane flips, slice); bounded in bytes, least
    recently used out first. One cache serves one encoder: the keys do not name the model."""

    def __init__(self, max_bytes: float = 2e9):
        self._items = LRUCache(max_bytes, cost=lambda features: features.element_size() * features.nelement())

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        return self._items.get(key)

    def put(self, key: Hashable, features: torch.Tensor) -> None:
        self._items.put(key, features)

    def __len__(self) -> int:
        return len(self._items)


def _flip_combinations(mirror_axes: Sequence[int]) -> List[Tuple[bool, bool, bool]]:
    """(depth, height, width) flips in the order of _internal_maybe_mirror_and_pred_3D: none, W, H,
    HW, D, DW, DH, DHW; only the axes in mirror_axes."""
    return [flips for flips in itertools.product((False, True), repeat=3)
            if all(axis in mirror_axes or not flip for axis, flip in enumerate(flips))]


@torch.no_grad()
def predict_probabilities(data: torch.Tensor, plans: Plans, encode: Encode, decode: Decode,
                          mirror_axes: Sequence[int] = (), cache: Optional[FeatureCache] = None,
                          cache_key: Hashable = None) -> torch.Tensor:
    """(M, D, H, W) network input on the model's device -> (C, D, H, W) float32 class probabilities,
    as nnU-Net v1's sliding window (see the module docstring); features cached under cache_key."""
    patch = plans.patch_size
    shape = tuple(data.shape[1:])
    padded_shape, before = padding(shape, patch)
    widths = [amount for a in (2, 1, 0) for amount in (before[a], padded_shape[a] - shape[a] - before[a])]
    padded = F.pad(data, widths)  # zeros, as pad_nd_image(..., 'constant', constant_values=0)
    starts = window_starts(padded_shape, patch)
    single = len(starts[0]) * len(starts[1]) * len(starts[2]) == 1
    weight = torch.ones(patch, device=data.device) if single else gaussian_importance(patch, data.device)
    summed = torch.zeros((plans.num_classes, *padded_shape), dtype=torch.float32, device=data.device)
    weights = torch.zeros(padded_shape, dtype=torch.float32, device=data.device)
    combinations = _flip_combinations(mirror_axes)
    for y in starts[1]:
        for x in starts[2]:
            columns = {(fh, fw): _column_features(padded, y, x, fh, fw, patch, encode, cache, cache_key)
                       for fh, fw in dict.fromkeys(flips[1:] for flips in combinations)}
            for z in starts[0]:
                window = torch.zeros((plans.num_classes, *patch), dtype=torch.float32, device=data.device)
                for fd, fh, fw in combinations:
                    features = torch.stack(columns[fh, fw][z:z + patch[0]], dim=1)[None]
                    logits = decode(features.flip(2) if fd else features)
                    if tuple(logits.shape) != (1, plans.num_classes, *patch):
                        raise ValueError(f"decode returned logits of shape {tuple(logits.shape)}, expected "
                                         f"{(1, plans.num_classes, *patch)} (the plans' classes and patch)")
                    probabilities = torch.softmax(logits.float(), 1)[0]
                    flipped = [dim for dim, flip in zip((1, 2, 3), (fd, fh, fw)) if flip]
                    window += 1 / len(combinations) * (probabilities.flip(flipped) if flipped else probabilities)
                box = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
                summed[(slice(None),) + box] += window * weight
                weights[box] += weight
    inner = tuple(slice(b, b + n) for b, n in zip(before, shape))
    return summed[(slice(None),) + inner] / weights[inner]


def _column_features(padded: torch.Tensor, y: int, x: int, flip_h: bool, flip_w: bool, patch: Sequence[int],
                     encode: Encode, cache: Optional[FeatureCache], cache_key: Hashable) -> List[torch.Tensor]:
    """Per slice of the padded volume: the encoder's features of the in-plane window at (y, x)
    (flipped as asked), from the cache or encoded patch[0] slices at a time, each slice once."""
    crop = padded[:, :, y:y + patch[1], x:x + patch[2]]
    flipped = [dim for dim, flip in ((2, flip_h), (3, flip_w)) if flip]
    crop = crop.flip(flipped) if flipped else crop
    depth = crop.shape[1]
    keys = [(cache_key, y, x, flip_h, flip_w, d) for d in range(depth)]
    features = [cache.get(key) if cache is not None else None for key in keys]
    missing = [d for d in range(depth) if features[d] is None]
    for run in np.split(np.array(missing, int), np.nonzero(np.diff(missing) != 1)[0] + 1) if missing else ():
        for chunk in np.array_split(run, int(np.ceil(len(run) / patch[0]))):
            first, count = int(chunk[0]), len(chunk)
            encoded = encode(crop[None, :, first:first + count])
            if encoded.ndim != 5 or encoded.shape[0] != 1 or encoded.shape[2] != count:
                raise ValueError(f"encode returned features of shape {tuple(encoded.shape)} for {count} slices; "
                                 f"expected (1, F, {count}, h, w)")
            for i in range(count):
                features[first + i] = encoded[0, :, i].clone()  # its own storage: cached and evicted alone
                if cache is not None:
                    cache.put(keys[first + i], features[first + i])
    return features


# ---- back to the image ----------------------------------------------------------------------------
def labels_on_itk_grid(probabilities: torch.Tensor, preprocessed: Preprocessed, plans: Plans) -> torch.Tensor:
    """(C, D, H, W) class probabilities on the network grid -> uint8 labels on the stored grid in
    SimpleITK's (z, y, x) order, on the same device (save_segmentation_nifti_from_softmax)."""
    probabilities = probabilities.permute(0, *[a + 1 for a in plans.transpose_backward])
    if plans.export_force_separate_z is None:
        axis = _separate_axis(preprocessed.itk_spacing, plans.target_spacing)  # the target's: network order (quirk)
    elif plans.export_force_separate_z:
        axes = _lowres_axes(preprocessed.itk_spacing)
        axis = int(axes[0]) if len(axes) == 1 else None
    else:
        axis = None
    cropped = _resample_argmax(probabilities, preprocessed.cropped_shape, axis, plans.export_order_z)
    labels = torch.zeros(preprocessed.itk_shape, dtype=torch.uint8, device=probabilities.device)
    labels[preprocessed.crop] = cropped
    return labels


def _resample_argmax(probabilities: torch.Tensor, shape: Tuple[int, ...], axis: Optional[int],
                     order_z: int) -> torch.Tensor:
    """argmax of resample_data_or_seg(probabilities, shape, order 1, separate `axis`, order_z), one
    output slice across `axis` (else axis 0, linearly) at a time."""
    if tuple(probabilities.shape[1:]) == tuple(shape):
        return probabilities.argmax(0).to(torch.uint8)
    outer = 0 if axis is None else axis
    slabs = probabilities.movedim(outer + 1, 1)
    n, size = slabs.shape[1], shape[outer]
    plane = tuple(s for a, s in enumerate(shape) if a != outer)
    labels = torch.empty((size, *plane), dtype=torch.uint8, device=probabilities.device)
    position = np.clip(n / size * (np.arange(size) + 0.5) - 0.5, 0, n - 1)
    nearest = _nearest(n, size)
    for o in range(size):
        if n == size:
            slab = slabs[:, o].double()
        elif axis is not None and order_z == 0:
            slab = slabs[:, nearest[o]].double()
        else:  # linear along the axis, edge-clamped: map_coordinates order 1, mode 'nearest'
            low = int(position[o])
            high, t = min(low + 1, n - 1), position[o] - low
            slab = (1 - t) * slabs[:, low].double() + t * slabs[:, high].double()
        resized = F.interpolate(slab[None], size=plane, mode="bilinear", align_corners=False)[0]
        labels[o] = resized.float().argmax(0)  # the official casts back to the softmax's float32 first
    return labels.movedim(0, outer)


# ---- the whole pipeline ---------------------------------------------------------------------------
def segment(image: np.ndarray, affine: np.ndarray, plans: Plans, encode: Encode, decode: Decode, *,
            mirror: bool = False, cache: Optional[FeatureCache] = None, image_key: Hashable = None,
            device: Union[str, torch.device] = "cpu") -> np.ndarray:
    """SAM3D's automatic segmentation of a stored volume: image (i, j, k) or (M, i, j, k), affine
    voxel -> RAS mm. Returns uint8 labels of shape (i, j, k), on the image's own grid (its affine
    applies unchanged). encode/decode run on `device`; mirror: nnU-Net's test-time mirroring along
    all three axes; cache with image_key (identifying the image's content): encoder features kept
    for later runs."""
    if cache is not None and image_key is None:
        raise ValueError("a feature cache needs an image_key that identifies the image's content")
    preprocessed = preprocess(image, affine, plans)
    data = torch.as_tensor(preprocessed.data, device=torch.device(device))  # the one move onto the device
    probabilities = predict_probabilities(data, plans, encode, decode, MIRROR_AXES if mirror else (), cache,
                                          (image_key, plans))
    labels = labels_on_itk_grid(probabilities, preprocessed, plans)
    return labels.cpu().numpy().transpose(2, 1, 0)  # back to the stored (i, j, k), as the device's only result
