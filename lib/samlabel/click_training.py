"""Fine-tuning a 3D click model's prompt encoder and mask decoder with simulated clicks, as the
FastSAM3D / SAM-Med3D decoder stage trains them (facts: ../shared/reference/distillation.md).

Upstream's recipe, kept: the image encoder frozen; per sample an 11-step click loop on one
label-centred 128^3 window, each step decoding all clicks so far with the previous step's low-res
logits as the mask prompt, the next click drawn at random from the error region (positive in a
false negative, negative in a false positive); at one random step in [2, 9) and at the last step
the model gets the mask prompt alone. The loss is MONAI's DiceCELoss(sigmoid=True,
squared_pred=True) of the logits upsampled to the window, summed over the steps. AdamW over the
prompt encoder and mask decoder, lr 8e-5, weight decay 0.1, lr x0.1 at 60 % and 90 % of the
epochs (upstream: MultiStepLR at 60 and 90 of 100 epochs), optional gradient accumulation
(upstream 32) and bfloat16 autocast (GPU).

Where we differ, and why: the encoder being frozen, each window's embedding is computed once
and kept (in memory, bounded; recomputed when evicted), so there is no random flip of the input
(upstream's RandomFlip would need a new encoder run per sample). The window is the one the
engine would place on the structure (its registry window grid, its 1.5 mm sampling and
normalisation): the model trains on what it is served.

No monailabel here: the training process and the GPU check import it alone.
"""

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .cache import LRUCache
from .device import autocast, on_host
from .files import atomic_write
from .geometry import Window, apply, place_window, sample_window
from .images import StoredImage
from .modeling import Sam
from .optimisation import GradientAccumulation, denormals_flushed, epoch_order
from .registry import ModelSpec
from .sam3d_training import utc_stamp

DEFAULT_CLICKS = 11
MASK_ONLY_RANGE = (2, 9)  # one step drawn from [2, 9) gets the mask prompt alone, as does the last
LR_MILESTONES, LR_GAMMA = (0.6, 0.9), 0.1  # fractions of the epochs
DICE_SMOOTH = 1e-5  # MONAI DiceLoss' smooth_nr = smooth_dr default


def tunable(spec: ModelSpec) -> bool:
    """Whether spec's network has the prompt encoder and mask decoder this fine-tuning trains."""
    with torch.device("meta"):
        return isinstance(spec.builder(), Sam)


# ---- the loss ---------------------------------------------------------------------------------------
def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MONAI's DiceCELoss(sigmoid=True, squared_pred=True) on (B, 1, *grid) logits and a {0, 1}
    target: 1 - (2 sum(p y) + s) / (sum(p^2) + sum(y^2) + s) per sample, averaged, plus the binary
    cross-entropy with logits, averaged over voxels."""
    probabilities = logits.sigmoid()
    axes = tuple(range(2, logits.ndim))
    dice = (2 * (probabilities * target).sum(axes) + DICE_SMOOTH) / (
        (probabilities**2).sum(axes) + (target**2).sum(axes) + DICE_SMOOTH)
    return (1 - dice).mean() + F.binary_cross_entropy_with_logits(logits, target)


# ---- examples and their embeddings ------------------------------------------------------------------------
@dataclass(frozen=True)
class ClickExample:
    """One labelled structure in the window the engine would place on it."""

    name: str  # "<image id>: <label value>"
    image_path: str
    window: Window
    target: np.ndarray  # bool (S, S, S) on the window grid, window axis order


def structure_window(image: StoredImage, structure: np.ndarray, spec: ModelSpec) -> Window:
    """The model window around a structure (bool on the image grid), placed as the engine places it
    around clicks spanning the structure's box; a structure wider than the window gets the window
    centred on its box along that axis."""
    box = np.argwhere(structure)
    low, high = box.min(0), box.max(0)
    corners = np.array([np.where(np.array(choice, bool), high, low) for choice in np.ndindex(2, 2, 2)])
    corners_ras = apply(image.affine, corners)
    return place_window(image.affine, corners_ras, spec.input_size[0], spec.spacing_mm,
                        anchor_ras=corners_ras.mean(0), grid=spec.window_grid)


def structure_example(name: str, image_path: str, image: StoredImage, structure: np.ndarray,
                      spec: ModelSpec) -> Optional[ClickExample]:
    """The example of one structure, or None when none of it reaches the window's 1.5 mm grid."""
    window = structure_window(image, structure, spec)
    target = sample_window(structure.astype(np.float32), image.affine, window).numpy() >= 0.5
    return ClickExample(name, image_path, window, target) if target.any() else None


class WindowEmbeddings:
    """The frozen encoder's embedding of each example's window, computed on first use and kept
    while they fit capacity_bytes (least recently used out; recomputed when needed again)."""

    def __init__(self, encoder: torch.nn.Module, read_image: Callable[[str], StoredImage],
                 preprocess: Callable, device: torch.device, capacity_bytes: float, dtype: torch.dtype = torch.float32):
        self.encoder, self.read_image, self.preprocess = encoder, read_image, preprocess
        self.device, self.dtype = device, dtype
        self.cache = LRUCache(capacity_bytes, cost=lambda t: t.numel() * t.element_size())
        self.encoded = 0

    @torch.no_grad()
    def get(self, example: ClickExample) -> torch.Tensor:
        key: Hashable = (example.image_path, example.window.key())
        embedding = self.cache.get(key)
        if embedding is None:
            image = self.read_image(example.image_path)
            volume = self.preprocess(sample_window(image.array, image.affine, example.window))
            with autocast(self.device, self.dtype):
                embedding = self.encoder(volume.reshape(1, 1, *volume.shape[-3:]).to(self.device, torch.float32)).float()
            self.cache.put(key, embedding)
            self.encoded += 1
        return embedding


# ---- the click loop -----------------------------------------------------------------------------------------
def random_error_click(prediction: torch.Tensor, target: torch.Tensor,
                       rng: np.random.Generator) -> Optional[Tuple[Tuple[int, ...], int]]:
    """A voxel drawn uniformly from the error region and its label (1: missed, 0: spilled), or None."""
    errors = torch.nonzero((prediction != target).flatten()).squeeze(1)
    if len(errors) == 0:
        return None
    index = int(errors[int(rng.integers(len(errors)))])
    point = tuple(int(i) for i in np.unravel_index(index, tuple(target.shape)))
    return point, int(target.flatten()[index])


def mask_only_steps(clicks: int, rng: np.random.Generator) -> Set[int]:
    """The steps that get the mask prompt alone: one drawn from [2, 9) (within the loop) and the last."""
    low, high = MASK_ONLY_RANGE[0], min(MASK_ONLY_RANGE[1], clicks - 1)
    return {clicks - 1} | ({int(rng.integers(low, high))} if high > low else set())


def click_loop(model: Sam, embedding: torch.Tensor, target: torch.Tensor, clicks: int,
               rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the loss summed over the steps, the last step's logits (1, 1, S, S, S)) of one example;
    target: (S, S, S) float {0, 1} on the model's device."""
    size = tuple(target.shape)
    mask_prompt = target.new_zeros((1, 1, *(s // 4 for s in size)))  # no previous result, as the engine's first click
    prediction = torch.zeros_like(target, dtype=torch.bool)
    points: List[Tuple[int, ...]] = []
    labels: List[int] = []
    mask_only = mask_only_steps(clicks, rng)
    loss = target.new_zeros(())
    dense_pe = model.prompt_encoder.get_dense_pe()  # the same for every step
    for step in range(clicks):
        if step not in mask_only:
            click = random_error_click(prediction, target.bool(), rng)
            if click is not None:
                points.append(click[0])
                labels.append(click[1])
        prompt = None if step in mask_only or not points else (
            torch.tensor([points], dtype=torch.float32, device=target.device),
            torch.tensor([labels], dtype=torch.long, device=target.device))
        sparse, dense = model.prompt_encoder(prompt, mask_prompt)
        low_res, _ = model.mask_decoder(embedding, dense_pe, sparse, dense, False)
        logits = F.interpolate(low_res.float(), size=size, mode="trilinear", align_corners=False)
        loss = loss + dice_ce_loss(logits, target[None, None])
        mask_prompt, prediction = low_res, logits[0, 0].detach() > 0
    return loss, logits


def hard_dice(logits: torch.Tensor, target: torch.Tensor) -> float:
    predicted, truth = logits > 0, target > 0.5
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((predicted & truth).sum()) / total


# ---- the training loop --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClickTrainingSettings:
    max_epochs: int
    iterations_per_epoch: int  # 0: one pass over the examples
    clicks: int = DEFAULT_CLICKS
    learning_rate: float = 8e-5
    weight_decay: float = 0.1
    gradient_accumulation: int = 1
    seed: int = 12345
    device: str = "cpu"
    mixed_precision: bool = False  # bfloat16 autocast (CUDA)


@dataclass
class ClickTrainingHistory:
    losses: List[float] = field(default_factory=list)  # mean summed loss per iteration, per epoch
    dice: List[float] = field(default_factory=list)  # mean Dice of the last step, per epoch
    learning_rates: List[float] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)


def learning_rate_at(epoch: int, settings: ClickTrainingSettings) -> float:
    passed = sum(epoch >= round(fraction * settings.max_epochs) for fraction in LR_MILESTONES)
    return settings.learning_rate * LR_GAMMA**passed


def trainable_parameters(model: Sam) -> List[torch.nn.Parameter]:
    """The prompt encoder's and mask decoder's; the image encoder is frozen."""
    model.image_encoder.requires_grad_(False)
    return [*model.prompt_encoder.parameters(), *model.mask_decoder.parameters()]


@denormals_flushed()
def train_clicks(model: Sam, examples: Sequence[ClickExample], embeddings: WindowEmbeddings,
                 settings: ClickTrainingSettings,
                 on_epoch: Optional[Callable[[ClickTrainingHistory], None]] = None,
                 ) -> Tuple[ClickTrainingHistory, torch.optim.AdamW]:
    """Train `model` (on settings.device) in place; on_epoch is called after every epoch."""
    device = torch.device(settings.device)
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(trainable_parameters(model), settings.learning_rate, weight_decay=settings.weight_decay)
    dtype = torch.bfloat16 if settings.mixed_precision else torch.float32
    iterations = settings.iterations_per_epoch or len(examples)
    history = ClickTrainingHistory()
    model.eval()  # no dropout or batch norm in the decoder; the frozen encoder stays as served
    accumulation = GradientAccumulation(optimizer, settings.gradient_accumulation)
    for epoch in range(settings.max_epochs):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(epoch, settings)
        losses, dice = [], []
        for index in epoch_order(rng, len(examples), iterations):
            example = examples[index]
            embedding = embeddings.get(example)
            target = torch.from_numpy(example.target).to(device, torch.float32)  # the one move in
            with autocast(device, dtype):
                loss, logits = click_loop(model, embedding, target, settings.clicks, rng)
            accumulation.backward(loss)
            losses.append(float(loss.detach()))
            dice.append(hard_dice(logits.detach(), target))
        history.losses.append(float(np.mean(losses)))
        history.dice.append(float(np.mean(dice)))
        history.learning_rates.append(optimizer.param_groups[0]["lr"])
        history.seconds.append(time.perf_counter() - started)
        if on_epoch is not None:
            on_epoch(history)
    accumulation.finish()
    return history, optimizer


# ---- the weights file ------------------------------------------------------------------------------------------------
def official_layout(spec: ModelSpec, model: Sam, optimizer: torch.optim.Optimizer, record: Dict) -> object:
    """The weights as spec's official file holds them (the 3D models: the training script's dict,
    weights under 'model_state_dict'), with the run's record (plain data: epoch, losses, ...) next
    to them, so that torch.load(weights_only=True) reads it."""
    state = on_host(model.state_dict())
    if spec.checkpoint_key is None:
        return state
    return {spec.checkpoint_key: state, "optimizer_state_dict": on_host(optimizer.state_dict()), **record, "model": spec.name}


def write_weights(folder: Path, checkpoint: object) -> Path:
    """Write `<folder>/<UTC time>.pth` atomically, never over an existing file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{utc_stamp()}.pth"
    while path.exists():
        path = folder / f"{utc_stamp()}.pth"
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(str(path), data=buffer.getvalue())
    return path
