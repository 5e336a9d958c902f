"""Training SAM3D's decoder on cached encoder features, as the official trainers train it
(UARK-AICV/SAM3D @ 4f54b7c, nnU-Net v1 by way of nnFormer), on the crops inference sees.

Official facts (sam3d/training/network_training/sam3d_trainer_*.py, Trainer_*.py,
network_trainer_*.py, run/default_configuration.py, loss_functions/dice_loss.py and
deep_supervision.py, data_augmentation/downsampling.py, dataloading/dataset_loading.py):
- Loss: DC_and_CE_loss({'batch_dice', 'smooth': 1e-5, 'do_bg': False}, {}): cross-entropy (mean over
  voxels) plus the negated soft Dice of the softmax, (2tp + 1e-5) / (2tp + fp + fn + 1e-5 + 1e-8),
  foreground classes only, averaged. Batch Dice (sums over the batch as well) when the plans have
  more than one stage, else per sample (default_configuration.py).
- Deep supervision: MultipleOutputLoss2 over (out1, out2, out3) with weights 1 / 2^i over
  len(pool_op_kernel_sizes), normalised to sum 1; default_configuration.py sets the SAM3D tasks'
  pool_op_kernel_sizes to [[1, 2, 2]] * 3, so the weights are (4, 2, 1) / 7. The targets
  (DownsampleSegForDSTransform2, order 0) are the label at scales [1, 1, 1], [1, .5, .5],
  [1, .25, .25]: skimage's order-0 resize, i.e. scipy's nearest neighbour at (o + 0.5) * n / m - 0.5
  (index floor(x + 0.5)): out2 sees voxels 1, 3, 5... and out3 voxels 2, 6, 10... in-plane.
- Optimiser: SGD over the decoder's parameters, lr 1e-2, momentum 0.99, Nesterov, weight decay
  3e-5; no scheduler object: at the start of epoch e, lr = lr0 (1 - e / max_epochs)^0.9 (poly_lr);
  gradient norm clipped to 12; 1000 epochs of 250 iterations; fp32 (fp16=False).
- Batches: the plans' batch_size (Synapse 2, ACDC 4); the last B - round(B (1 - 0.33)) samples of
  each batch contain foreground: a random class present in the case, a random voxel of it (of at
  most 10,000 kept per class) at the patch centre, clamped to the volume.
- Online evaluation: hard Dice 2tp / (2tp + fp + fn) per foreground class from out1's argmax,
  tp/fp/fn summed over the epoch, classes without any dropped (NaN), averaged.
- The checkpoint: torch.save of {'epoch', 'state_dict', 'optimizer_state_dict',
  'lr_scheduler_state_dict' (None), 'plot_stuff' (train losses, val losses, val losses in train
  mode, eval metrics), 'best_stuff'}, plus the plans pickled next to it as `<file>.pkl`.

Where we differ, and why:
- The encoder is frozen, so its features are computed once per image and kept on disk (float16):
  the decoder is about 1/15 of the cost. Hence no augmentation of the encoder's input (upstream's
  rotation, scaling, gamma, noise...): only the depth mirror, which is exact on features (the
  encoder sees every slice on its own, so a depth flip only reverses their order).
- In-plane crops are the tiles inference uses (autoseg.window_starts over the padded volume), not
  random positions: the encoder's features depend on the exact in-plane crop. Depth crops start
  anywhere. A foreground sample takes the tile whose centre is nearest the chosen voxel.
- There is no held-out set (the annotator's few labels are all used): the Dice reported is the
  training batches', and 'plot_stuff' holds it as the eval metric, with no validation losses.
"""

import hashlib
import io
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import autoseg
from .files import atomic_write
from .device import on_host, to_host
from .images import StoredImage, file_key

DICE_SMOOTH = 1e-5
DEEP_SUPERVISION_WEIGHTS = (4 / 7, 2 / 7, 1 / 7)  # out1, out2, out3: 1 / 2^i over 3 outputs, normalised
MOMENTUM, WEIGHT_DECAY, GRADIENT_CLIP, POLY_EXPONENT = 0.99, 3e-5, 12.0, 0.9
OVERSAMPLE_FOREGROUND = 0.33
FOREGROUND_LOCATIONS = 10_000  # voxel positions kept per class to centre foreground samples on
FEATURES_FILE, GRID_FILE = "features.npy", "grid.json"


# ---- the label on the network's grid -----------------------------------------------------------
@dataclass(frozen=True)
class VolumeGrid:
    """How a stored image maps onto the network's grid (autoseg.Preprocessed without the data)."""

    crop: Tuple[slice, slice, slice]  # the nonzero box in SimpleITK's (z, y, x)
    itk_spacing: Tuple[float, float, float]
    network_shape: Tuple[int, int, int]  # (D, H, W): cropped, transposed, resampled; before padding

    def to_json(self) -> dict:
        return {"crop": [[s.start, s.stop] for s in self.crop], "itk_spacing": list(self.itk_spacing),
                "network_shape": list(self.network_shape)}

    @classmethod
    def from_json(cls, value: dict) -> "VolumeGrid":
        return cls(tuple(slice(a, b) for a, b in value["crop"]), tuple(value["itk_spacing"]), tuple(value["network_shape"]))


def resize_segmentation(seg: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """batchgenerators' resize_segmentation(seg, shape, order=1): each label's indicator resized
    linearly (skimage 0.18.1's resize, as autoseg), the label written where it reaches 0.5, labels
    in ascending order so that a higher one wins."""
    resized = np.zeros(tuple(shape), np.uint8)
    for value in np.unique(seg):
        if value:  # 0 comes first and is written onto zeros: nothing to do
            resized[autoseg._skimage_resize((seg == value).astype(np.float64), tuple(shape), 1) >= 0.5] = value
    return resized


def labels_on_network_grid(label: np.ndarray, grid: VolumeGrid, plans: autoseg.Plans) -> np.ndarray:
    """A label map of the stored image (i, j, k) -> uint8 (D, H, W) on the network's grid, as
    nnU-Net v1 preprocesses a training case's segmentation: the image's nonzero crop, transpose,
    resample_data_or_seg with order 1 (resize_segmentation) in-plane and order 0 along a separate
    low-resolution axis (the same axis as the image's). Voxels outside the crop are dropped, and the
    crop's outside (-1 upstream) is background, as RemoveLabelTransform(-1, 0) makes it."""
    forward = plans.transpose_forward
    seg = np.asarray(label).transpose(2, 1, 0)[grid.crop].transpose(forward)
    shape = tuple(grid.network_shape)
    if seg.shape == shape:
        return seg.astype(np.uint8)
    axis = autoseg._separate_axis(np.array(grid.itk_spacing)[list(forward)], np.array(plans.target_spacing))
    return autoseg.resample_separately(seg, shape, axis, resize_segmentation)


def pad_to(array: np.ndarray, padded_shape: Sequence[int], before: Sequence[int]) -> np.ndarray:
    """Zero-pad the last three axes of `array` to padded_shape with `before` zeros in front."""
    widths = [(0, 0)] * (array.ndim - 3) + [(b, q - n - b) for q, n, b in zip(padded_shape, array.shape[-3:], before)]
    return np.pad(array, widths)


def tiles(padded_shape: Sequence[int], patch: Sequence[int]) -> List[Tuple[int, int]]:
    """The in-plane window starts (y, x) of inference's sliding window."""
    starts = autoseg.window_starts(padded_shape, patch)
    return [(y, x) for y in starts[1] for x in starts[2]]


# ---- encoder features on disk ------------------------------------------------------------------
def encoder_identity(path, encoder: nn.Module) -> str:
    """Names the encoder for the cache key: its file's identity and the network's size."""
    return repr((file_key(str(path)), encoder.img_size, sum(p.numel() for p in encoder.parameters())))


@dataclass
class CachedFeatures:
    """One image's encoder features: (tiles, D, F, h, w) float16, memory-mapped, on the padded grid."""

    grid: VolumeGrid
    features: np.ndarray
    tiles: List[Tuple[int, int]]
    folder: Path
    bytes: int
    seconds: float  # preprocessing and encoding; 0 when read from the cache
    reused: bool


class FeatureStore:
    """Encoder features of whole images on disk, one folder per (image content, plans, encoder),
    written once (a temporary file renamed into place, the grid file last: a folder without it is
    an interrupted write) and memory-mapped when read. The least recently used folders beyond
    max_bytes are deleted after a run (`evict`)."""

    def __init__(self, root, max_bytes: float):
        self.root, self.max_bytes = Path(root), max_bytes

    def folder(self, image: StoredImage, plans: autoseg.Plans, encoder: str) -> Path:
        digest = hashlib.sha256(repr((image.key, plans, encoder)).encode()).hexdigest()[:32]
        return self.root / digest

    def features(self, image: StoredImage, plans: autoseg.Plans, encoder: str, encode: autoseg.Encode,
                 device: torch.device, slices_per_call: int) -> CachedFeatures:
        folder = self.folder(image, plans, encoder)
        reused = (folder / GRID_FILE).is_file()
        started = time.perf_counter()
        if not reused:
            shutil.rmtree(folder, ignore_errors=True)  # an interrupted write
            folder.mkdir(parents=True)
            self._write(folder, image, plans, encode, device, slices_per_call)
        os.utime(folder / GRID_FILE)  # the folder's last use, for evict
        grid = VolumeGrid.from_json(json.loads((folder / GRID_FILE).read_text())["grid"])
        features = np.load(folder / FEATURES_FILE, mmap_mode="r")
        padded_shape, _ = autoseg.padding(grid.network_shape, plans.patch_size)
        return CachedFeatures(grid, features, tiles(padded_shape, plans.patch_size), folder, features.nbytes,
                              0.0 if reused else time.perf_counter() - started, reused)

    @staticmethod
    @torch.no_grad()
    def _write(folder: Path, image: StoredImage, plans: autoseg.Plans, encode: autoseg.Encode, device: torch.device,
               slices_per_call: int) -> None:
        preprocessed = autoseg.preprocess(image.array, image.affine, plans)
        patch = plans.patch_size
        padded_shape, before = autoseg.padding(preprocessed.data.shape[1:], patch)
        volume = torch.as_tensor(pad_to(preprocessed.data, padded_shape, before), device=device)  # the one move in
        windows = tiles(padded_shape, patch)
        temporary = folder / f"{FEATURES_FILE}.part"
        stored = None
        for t, (y, x) in enumerate(windows):
            for z in range(0, padded_shape[0], slices_per_call):
                crop = volume[None, :, z:z + slices_per_call, y:y + patch[1], x:x + patch[2]]
                encoded = encode(crop)[0].transpose(0, 1).half().cpu().numpy()  # (n, F, h, w): out as float16
                if stored is None:
                    stored = np.lib.format.open_memmap(temporary, "w+", np.float16,
                                                       (len(windows), padded_shape[0], *encoded.shape[1:]))
                stored[t, z:z + len(encoded)] = encoded
        stored.flush()
        del stored
        os.replace(temporary, folder / FEATURES_FILE)
        grid = VolumeGrid(preprocessed.crop, preprocessed.itk_spacing, tuple(preprocessed.data.shape[1:]))
        atomic_write(str(folder / GRID_FILE), data=json.dumps({"grid": grid.to_json(), "image": str(image.key[0])}).encode())

    def evict(self, keep: Sequence[Path]) -> List[Path]:
        """Delete the least recently used folders (not those in keep) until the store fits max_bytes."""
        entries = [(f, (f / GRID_FILE).stat().st_mtime if (f / GRID_FILE).is_file() else 0.0,
                    sum(p.stat().st_size for p in f.iterdir())) for f in self.root.iterdir() if f.is_dir()]
        total, removed = sum(size for _, _, size in entries), []
        for folder, _, size in sorted(entries, key=lambda entry: entry[1]):
            if total <= self.max_bytes:
                break
            if folder not in keep:
                shutil.rmtree(folder, ignore_errors=True)
                total -= size
                removed.append(folder)
        return removed


# ---- plans for a fresh decoder without official files ----------------------------------------------
AIR_HU = -500  # images that reach this are taken as CT (Hounsfield units)


@dataclass(frozen=True)
class CaseSummary:
    """What nnU-Net v1's DatasetAnalyzer keeps of a labelled case for planning."""

    itk_spacing: Tuple[float, float, float]
    foreground: np.ndarray  # the labelled voxels' intensities, every 10th in SimpleITK's (z, y, x) order
    minimum: float

    @classmethod
    def of(cls, image: StoredImage, labels: np.ndarray) -> "CaseSummary":
        """image: as stored (i, j, k); labels: class ids on the same grid."""
        spacing = tuple(float(s) for s in np.linalg.norm(image.affine[:3, :3], axis=0)[::-1])
        voxels = image.array.transpose(2, 1, 0)[labels.transpose(2, 1, 0) > 0][::10]
        return cls(spacing, voxels.astype(np.float64), float(image.array.min()))


def derived_plans(cases: Sequence[CaseSummary], patch_size: Sequence[int], num_classes: int, batch_size: int = 2) -> dict:
    """A .model.pkl's content for a decoder trained from the labels alone, nnU-Net v1-style:
    target spacing the cases' median (ExperimentPlanner3D_v21's default; its anisotropic rule,
    the 10th percentile along a thick axis, is not applied); "CT" normalisation with the labelled
    voxels' statistics (DatasetAnalyzer: every 10th foreground voxel; mean, sd, 0.5 / 99.5
    percentiles) when the images reach AIR_HU, else per-image z-scoring ("nonCT"); the SAM3D
    trainers' patch (the registry's), batch size and pool ops; one stage, no transposes."""
    voxels = np.concatenate([case.foreground for case in cases])  # not empty: the task checks
    ct = min(case.minimum for case in cases) <= AIR_HU
    intensity = {"median": float(np.median(voxels)), "mean": float(voxels.mean()), "sd": float(voxels.std()),
                 "mn": float(voxels.min()), "mx": float(voxels.max()),
                 "percentile_99_5": float(np.percentile(voxels, 99.5)), "percentile_00_5": float(np.percentile(voxels, 0.5))}
    spacing = np.median([case.itk_spacing for case in cases], axis=0)
    stage = {"batch_size": batch_size, "patch_size": np.array(patch_size), "current_spacing": spacing,
             "original_spacing": spacing, "pool_op_kernel_sizes": [[1, 2, 2]] * 3, "do_dummy_2D_data_aug": False}
    plans = {
        "num_stages": 1, "num_modalities": 1, "modalities": {0: "CT" if ct else "MRI"},
        "normalization_schemes": {0: "CT" if ct else "nonCT"}, "use_mask_for_norm": {0: False},
        "dataset_properties": {"intensityproperties": {0: intensity}, "all_spacings": [np.array(c.itk_spacing) for c in cases]},
        "plans_per_stage": {0: stage}, "num_classes": num_classes - 1, "all_classes": list(range(1, num_classes)),
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
    }
    return {"init": (), "name": "Sam3DTraining", "class": "samlabel.tasks.train_auto.Sam3DTraining", "plans": plans}


# ---- batches ---------------------------------------------------------------------------------------
@dataclass
class TrainingVolume:
    """One labelled image, ready to sample from: its cached features and its label, padded alike."""

    name: str
    features: np.ndarray  # (tiles, D, F, h, w) float16
    tiles: List[Tuple[int, int]]
    labels: np.ndarray  # (D, H, W) uint8 on the padded grid
    foreground: Dict[int, np.ndarray] = field(default_factory=dict)  # class -> (N, 3) voxel positions

    @classmethod
    def build(cls, name: str, features: np.ndarray, tiles: List[Tuple[int, int]], labels: np.ndarray,
              patch: Sequence[int], rng: np.random.Generator) -> "TrainingVolume":
        """features and tiles: CachedFeatures'; labels: (D, H, W) on the unpadded network grid
        (labels_on_network_grid)."""
        padded_shape, before = autoseg.padding(labels.shape, patch)
        padded = pad_to(labels, padded_shape, before)
        foreground = {}
        for value in np.unique(padded[padded > 0]):
            where = np.flatnonzero(padded == value)
            kept = rng.choice(where, min(len(where), FOREGROUND_LOCATIONS), replace=False)
            foreground[int(value)] = np.stack(np.unravel_index(np.sort(kept), padded.shape), axis=1)
        return cls(name, features, tiles, padded, foreground)


def _foreground_window(volume: TrainingVolume, patch: Sequence[int], rng: np.random.Generator) -> Tuple[int, int]:
    """(tile, depth start) of a patch centred on a random voxel of a random class present."""
    classes = sorted(volume.foreground)
    locations = volume.foreground[classes[rng.integers(len(classes))]]
    z, y, x = locations[rng.integers(len(locations))]
    centres = np.array([(ty + patch[1] / 2, tx + patch[2] / 2) for ty, tx in volume.tiles])
    tile = int(np.argmin(((centres - (y, x)) ** 2).sum(1)))
    return tile, int(np.clip(z - patch[0] // 2, 0, volume.labels.shape[0] - patch[0]))


def sample_batch(volumes: Sequence[TrainingVolume], patch: Sequence[int], batch_size: int, rng: np.random.Generator,
                 mirror_depth: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(features (B, F, P0, h, w) float16, target (B, P0, P1, P2) uint8) on the host."""
    first_forced = round(batch_size * (1 - OVERSAMPLE_FOREGROUND))  # DataLoader3D.get_do_oversample
    features, targets = [], []
    for b in range(batch_size):
        volume = volumes[rng.integers(len(volumes))]
        if b >= first_forced and volume.foreground:
            tile, z = _foreground_window(volume, patch, rng)
        else:
            tile, z = int(rng.integers(len(volume.tiles))), int(rng.integers(volume.labels.shape[0] - patch[0] + 1))
        y, x = volume.tiles[tile]
        crop = np.asarray(volume.features[tile, z:z + patch[0]]).transpose(1, 0, 2, 3)  # (F, P0, h, w)
        target = volume.labels[z:z + patch[0], y:y + patch[1], x:x + patch[2]]
        if mirror_depth and rng.random() < 0.5:
            crop, target = crop[:, ::-1], target[::-1]
        features.append(crop)
        targets.append(target)
    return np.stack(features), np.stack(targets)


# ---- loss -----------------------------------------------------------------------------------------
def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool) -> torch.Tensor:
    """DC_and_CE_loss(soft_dice_kwargs={'batch_dice', 'smooth': 1e-5, 'do_bg': False}) of logits
    (B, C, D, H, W) against class ids (B, D, H, W)."""
    cross_entropy = F.cross_entropy(logits, target)
    probabilities = logits.softmax(1)
    onehot = torch.zeros_like(probabilities).scatter_(1, target[:, None], 1)  # as get_tp_fp_fn_tn builds it
    axes = (0, *range(2, logits.ndim)) if batch_dice else tuple(range(2, logits.ndim))
    tp = (probabilities * onehot).sum(axes)
    fp = probabilities.sum(axes) - tp  # sum p (1 - y)
    fn = onehot.sum(axes) - tp  # sum (1 - p) y
    dice = (2 * tp + DICE_SMOOTH) / (2 * tp + fp + fn + DICE_SMOOTH + 1e-8)
    return cross_entropy - dice[..., 1:].mean()


def downsampled_target(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """DownsampleSegForDSTransform2's order-0 resize of (B, D, H, W) class ids to (B, *shape)."""
    for axis, size in enumerate(shape, start=1):
        if target.shape[axis] != size:
            index = torch.as_tensor(autoseg._nearest(target.shape[axis], size), device=target.device)
            target = target.index_select(axis, index)
    return target


def deep_supervision_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor, batch_dice: bool) -> torch.Tensor:
    """MultipleOutputLoss2: the weighted sum over (out1, out2, out3) against the downsampled targets."""
    return sum(weight * dice_ce_loss(logits, downsampled_target(target, logits.shape[2:]), batch_dice)
               for weight, logits in zip(DEEP_SUPERVISION_WEIGHTS, outputs))


def hard_counts(logits: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """(3, C - 1): tp, fp, fn per foreground class of the argmax, summed over the batch."""
    predicted = logits.argmax(1)
    classes = torch.arange(1, logits.shape[1], device=logits.device).view(-1, 1, 1, 1, 1)
    hit, truth = predicted[None] == classes, target[None] == classes
    counts = torch.stack([(hit & truth).sum((1, 2, 3, 4)), (hit & ~truth).sum((1, 2, 3, 4)), (~hit & truth).sum((1, 2, 3, 4))])
    return to_host(counts)[0].astype(np.float64)


def global_dice(counts: np.ndarray) -> float:
    """finish_online_evaluation: mean over classes of 2tp / (2tp + fp + fn), classes without any dropped."""
    tp, fp, fn = counts
    denominator = 2 * tp + fp + fn
    return float(np.mean(2 * tp[denominator > 0] / denominator[denominator > 0])) if (denominator > 0).any() else 0.0


def poly_lr(epoch: int, max_epochs: int, initial_lr: float) -> float:
    return initial_lr * (1 - epoch / max_epochs) ** POLY_EXPONENT


# ---- the training loop --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingSettings:
    max_epochs: int
    iterations_per_epoch: int
    batch_size: int
    learning_rate: float
    seed: int
    device: str
    batch_dice: bool
    mirror_depth: bool = True


@dataclass
class TrainingHistory:
    losses: List[float] = field(default_factory=list)  # mean training loss per epoch
    dice: List[float] = field(default_factory=list)  # global foreground Dice of the epoch's batches
    learning_rates: List[float] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)  # per epoch

    @property
    def best_epoch(self) -> int:
        """1-based epoch of the best Dice (the first one on ties); after at least one epoch."""
        return int(np.argmax(self.dice)) + 1


@contextmanager
def deterministic_cudnn() -> Iterator[None]:
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def make_optimizer(decoder: nn.Module, learning_rate: float) -> torch.optim.SGD:
    return torch.optim.SGD(decoder.parameters(), learning_rate, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, nesterov=True)


def train_decoder(decoder: nn.Module, volumes: Sequence[TrainingVolume], patch: Sequence[int],
                  settings: TrainingSettings, on_epoch: Optional[Callable[[TrainingHistory], None]] = None,
                  ) -> Tuple[TrainingHistory, torch.optim.SGD]:
    """Train `decoder` (on settings.device) in place on the volumes' cached features; on_epoch is
    called after every epoch with the history so far."""
    device = torch.device(settings.device)
    rng = np.random.default_rng(settings.seed)
    optimizer = make_optimizer(decoder, settings.learning_rate)
    history = TrainingHistory()
    decoder.train()
    with deterministic_cudnn():
        for epoch in range(settings.max_epochs):
            started = time.perf_counter()
            learning_rate = poly_lr(epoch, settings.max_epochs, settings.learning_rate)
            optimizer.param_groups[0]["lr"] = learning_rate
            losses, counts = [], 0
            for _ in range(settings.iterations_per_epoch):
                features, target = sample_batch(volumes, patch, settings.batch_size, rng, settings.mirror_depth)
                features = torch.from_numpy(features).to(device, torch.float32)  # the one move in
                target = torch.from_numpy(target).to(device, torch.long)
                optimizer.zero_grad(set_to_none=True)
                outputs = decoder(features, deep_supervision=True)
                loss = deep_supervision_loss(outputs, target, settings.batch_dice)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(decoder.parameters(), GRADIENT_CLIP)
                optimizer.step()
                losses.append(loss.item())
                with torch.no_grad():
                    counts = counts + hard_counts(outputs[0], target)
            history.losses.append(float(np.mean(losses)))
            history.dice.append(global_dice(counts))
            history.learning_rates.append(learning_rate)
            history.seconds.append(time.perf_counter() - started)
            if on_epoch is not None:
                on_epoch(history)
    decoder.eval()
    return history, optimizer


# ---- the official checkpoint -----------------------------------------------------------------------------
def nnunet_checkpoint(decoder: nn.Module, optimizer: torch.optim.Optimizer, history: TrainingHistory) -> dict:
    """What network_trainer_*.save_checkpoint saves after training: 'epoch' is the epochs run.
    'plot_stuff' = (train losses, validation losses (none), validation losses in train mode (none),
    eval metric = training Dice); 'best_stuff' = (best epoch, its loss, its Dice), Python floats."""
    best = history.best_epoch
    return {
        "epoch": len(history.losses),
        "state_dict": on_host(decoder.state_dict()),
        "optimizer_state_dict": on_host(optimizer.state_dict()),
        "lr_scheduler_state_dict": None,  # poly lr set by hand, as upstream
        "plot_stuff": (list(history.losses), [], [], list(history.dice)),
        "best_stuff": (best, history.losses[best - 1], history.dice[best - 1]),
    }


def utc_stamp() -> str:
    """A file name stem that sorts by time: 20250101T120000.123456Z."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def write_decoder_files(folder, checkpoint: dict, plans_bytes: bytes) -> Path:
    """Write `<folder>/<UTC time>.model` and its plans `.model.pkl`, each atomically, the plans first
    (the .model is what readers look for); never over an existing file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{utc_stamp()}.model"
    while path.exists():
        path = folder / f"{utc_stamp()}.model"
    atomic_write(f"{path}.pkl", data=plans_bytes)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(str(path), data=buffer.getvalue())
    return path
