"""Distilling SAM-Med3D-turbo's 12-block image encoder into FastSAM3D's 6-block one, as FastSAM3D's
distillation stage does (facts: ../shared/reference/distillation.md).

Upstream's recipe, kept: 128^3 windows of the images, one label-centred window per labelled image
(CropOrPad(mask_name='label')), preprocessed as the official pipeline does (1.5 mm, RAS+,
ZNormalization over voxels > 0); the teacher's outputs computed once and kept on disk with the
normalised window; the loss the MSE between the student's and the teacher's neck outputs
(B, 384, 8, 8, 8); AdamW over the student encoder, lr 8e-4, betas (0.9, 0.999), weight decay 0.1,
batch 1, optional gradient accumulation (upstream 10) and autocast (upstream fp16 with a
GradScaler; here bfloat16, which needs no scaler, on CUDA). Upstream's MultiStepLR milestones (120,
180) lie beyond its 84 epochs, so its lr is constant: so is ours.

The layer-wise progressive option (upstream's commits 316aaa8 - 87752dc, dropped at HEAD) adds
block-output MSE terms to the neck's, one more depth level every E epochs. Upstream paired its
output lists by index (after block 2k of each network), so its student's last block met the
teacher's 6th, and the schedule ran past its lists (it cannot have run its 84 epochs). Here the
pairing is by relative depth: student block i (1-based) with teacher block i * T // S, i.e. for
FastSAM3D / SAM-Med3D student blocks 1..6 with teacher blocks 2, 4, ..., 12, so the last pair meets
where the necks start. Level n holds the n shallowest pairs; levels stop growing at all S pairs.
The neck term is always there.

Where we differ, and why:
- The window is normalised once; upstream's training loop z-normalised the saved, already
  normalised window again (its x > 0 mask then covers other voxels): a defect, not copied.
- The window is the one the engine places (its registry window grid, geometry.sample_window):
  the student learns on what it is served. Images without a label (or with an empty one) get
  windows centred on points drawn at random inside the image (seeded per image, so a second run
  finds them in the cache); labelled images' further windows (crops_per_image > 1) too.
- The teacher runs as SAM-Med3D computes it (pre-norm blocks, the network our engine serves for
  sam_med3d), not through FastSAM3D's modified block arithmetic as upstream's preparelabel.py
  ran it: the student learns the embeddings SAM-Med3D's own decoder reads.
- The distilled network is a whole FastSAM3D: the student encoder with the prompt encoder and
  mask decoder of the FastSAM3D weights it started from; started from scratch, with the teacher's
  (the decoder that reads the embeddings the student is taught to produce).

No monailabel here: the training process, the benchmark and the GPU check import it alone.
"""

import hashlib
import json
import shutil
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .click_training import official_layout, structure_window
from .device import autocast
from .files import atomic_write
from .geometry import Window, apply, place_window, sample_window
from .images import StoredImage, file_key
from .modeling import Sam
from .optimisation import GradientAccumulation, denormals_flushed, epoch_order
from .registry import ModelSpec

TEACHERS = {"fastsam3d": "sam_med3d"}  # student registry entry -> the entry whose encoder it learns from
INPUT_FILE, NECK_FILE, DONE_FILE = "input.npy", "neck.npy", "crop.json"


def block_file(depth: int) -> str:
    return f"block_{depth}.npy"


# ---- depth pairing -----------------------------------------------------------------------------------------
def depth_pairs(student_depth: int, teacher_depth: int) -> List[Tuple[int, int]]:
    """(student block, teacher block), 1-based: block i with teacher block i * T // S, shallowest first."""
    return [(i, i * teacher_depth // student_depth) for i in range(1, student_depth + 1)]


def active_pairs(pairs: Sequence[Tuple[int, int]], epoch: int, progressive_epochs: int) -> List[Tuple[int, int]]:
    """The pairs in the loss at `epoch` (0-based): none without the layer-wise option, else one
    level at first and one more every progressive_epochs epochs, up to all of them."""
    if not progressive_epochs:
        return []
    return list(pairs[:min(len(pairs), 1 + epoch // progressive_epochs)])


@contextmanager
def block_outputs(encoder: nn.Module, depths: Sequence[int]) -> Iterator[Dict[int, torch.Tensor]]:
    """Within the block, each forward of `encoder` records the output (B, D, H, W, C) of its block
    at every 1-based depth in `depths`."""
    outputs: Dict[int, torch.Tensor] = {}

    def recorder(depth):
        return lambda module, inputs, output: outputs.__setitem__(depth, output)

    handles = [encoder.blocks[depth - 1].register_forward_hook(recorder(depth)) for depth in depths]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, volume: torch.Tensor, depths: Sequence[int]) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
    """(the teacher encoder's neck output (1, C, g, g, g), its block outputs at `depths`), float32."""
    with block_outputs(teacher, depths) as blocks:
        neck = teacher(volume)
    return neck.float(), {depth: output.float() for depth, output in blocks.items()}


def student_loss(student: nn.Module, volume: torch.Tensor, neck_target: torch.Tensor,
                 block_targets: Dict[int, torch.Tensor], pairs: Sequence[Tuple[int, int]],
                 dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the loss: neck MSE plus the MSE of each (student, teacher) block pair; the neck MSE alone)."""
    with block_outputs(student, [s for s, _ in pairs]) as blocks, autocast(volume.device, dtype):
        neck = student(volume)
    neck_mse = F.mse_loss(neck.float(), neck_target)
    loss = neck_mse + sum(F.mse_loss(blocks[s].float(), block_targets[t]) for s, t in pairs)
    return loss, neck_mse.detach()


# ---- crops and their teacher targets ------------------------------------------------------------------------
@dataclass(frozen=True)
class Crop:
    """One model window on a stored image."""

    name: str  # "<image id>: label" or "<image id>: sample <k>"
    image_path: str
    window: Window


def image_crops(image_id: str, image_path: str, image: StoredImage, label: Optional[np.ndarray], count: int,
                spec: ModelSpec, seed: int) -> List[Crop]:
    """`count` windows on an image: the first around its label's nonzero voxels when it has any
    (placed as the engine places a window around a structure), the others (all of them without a
    label) centred on points drawn uniformly inside the image, the same for the same seed and image id."""
    crops = []
    if label is not None and label.any():
        crops.append(Crop(f"{image_id}: label", image_path, structure_window(image, label != 0, spec)))
    rng = np.random.default_rng([seed, zlib.crc32(image_id.encode())])
    for k in range(count - len(crops)):
        centre = apply(image.affine, rng.uniform(0, np.array(image.array.shape) - 1))
        window = place_window(image.affine, centre, spec.input_size[0], spec.spacing_mm, grid=spec.window_grid)
        crops.append(Crop(f"{image_id}: sample {k + 1}", image_path, window))
    return crops


@dataclass(frozen=True)
class CachedCrop:
    """A crop's normalised window and teacher outputs on disk."""

    crop: Crop
    folder: Path
    reused: bool

    def load(self, name: str, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.load(self.folder / name)).to(device)

    def volume(self, device: torch.device) -> torch.Tensor:
        """The student's input (1, 1, S, S, S)."""
        return self.load(INPUT_FILE, device)[None, None]

    def targets(self, depths: Sequence[int], device: torch.device) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
        """(the teacher's neck output (1, C, g, g, g), its block outputs (1, g, g, g, E) at `depths`)."""
        return self.load(NECK_FILE, device)[None], {d: self.load(block_file(d), device)[None] for d in depths}


class TeacherTargets:
    """The teacher's outputs per crop, on disk: one folder per (image file, window, teacher file,
    depths kept) holding the normalised window (input.npy, float32, the student's input), the neck
    output (neck.npy) and, for the layer-wise option, the block outputs (block_<depth>.npy), written
    once, crop.json last (a folder without it is an interrupted write)."""

    def __init__(self, root, teacher_identity: str, depths: Sequence[int]):
        self.root, self.teacher_identity, self.depths = Path(root), teacher_identity, tuple(depths)

    def folder(self, crop: Crop) -> Path:
        key = (file_key(crop.image_path), crop.window.key(), self.teacher_identity, self.depths)
        return self.root / hashlib.sha256(repr(key).encode()).hexdigest()[:32]

    def prepare(self, crops: Sequence[Crop], read_image: Callable[[str], StoredImage], preprocess: Callable,
                load_teacher: Callable[[], nn.Module], device: torch.device,
                on_crop: Optional[Callable[[CachedCrop], None]] = None) -> List[CachedCrop]:
        """Every crop's files, computed where missing (the teacher loaded on first need); then the
        folders of other crops are deleted: the store holds the last run's crops."""
        cached, teacher = [], None
        for crop in crops:
            folder = self.folder(crop)
            reused = (folder / DONE_FILE).is_file()
            if not reused:
                teacher = teacher or load_teacher()
                self._write(folder, crop, read_image, preprocess, teacher, device)
            cached.append(CachedCrop(crop, folder, reused))
            if on_crop is not None:
                on_crop(cached[-1])
        keep = {c.folder for c in cached}
        for folder in self.root.iterdir():
            if folder.is_dir() and folder not in keep:
                shutil.rmtree(folder, ignore_errors=True)
        return cached

    def _write(self, folder: Path, crop: Crop, read_image: Callable[[str], StoredImage], preprocess: Callable,
               teacher: nn.Module, device: torch.device) -> None:
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted write
        folder.mkdir(parents=True)
        image = read_image(crop.image_path)
        volume = preprocess(sample_window(image.array, image.affine, crop.window)).to(torch.float32)
        neck, blocks = teacher_outputs(teacher, volume[None, None].to(device), self.depths)
        np.save(folder / INPUT_FILE, volume.numpy())
        np.save(folder / NECK_FILE, neck[0].cpu().numpy())
        for depth, output in blocks.items():
            np.save(folder / block_file(depth), output[0].cpu().numpy())
        atomic_write(str(folder / DONE_FILE), data=json.dumps({"crop": crop.name, "image": crop.image_path}).encode())


# ---- the training loop ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistillationSettings:
    max_epochs: int
    iterations_per_epoch: int = 0  # 0: one pass over the crops
    learning_rate: float = 8e-4
    weight_decay: float = 0.1
    gradient_accumulation: int = 1
    progressive_epochs: int = 0  # 0: the neck alone; E: one more depth pair every E epochs
    seed: int = 12345
    device: str = "cpu"
    mixed_precision: bool = False  # bfloat16 autocast (CUDA)


@dataclass
class DistillationHistory:
    losses: List[float] = field(default_factory=list)  # mean loss per iteration, per epoch
    neck_mse: List[float] = field(default_factory=list)  # mean neck MSE per iteration, per epoch
    depth_levels: List[int] = field(default_factory=list)  # block pairs in the loss, per epoch
    seconds: List[float] = field(default_factory=list)


@torch.no_grad()
def mean_neck_mse(student: nn.Module, crops: Sequence[CachedCrop], device: torch.device,
                  dtype: torch.dtype = torch.float32) -> float:
    """The student's neck MSE against the teacher's, averaged over the crops."""
    return float(np.mean([float(student_loss(student, c.volume(device), c.targets((), device)[0], {}, (), dtype)[1])
                          for c in crops]))


@denormals_flushed()
def distill(student: nn.Module, crops: Sequence[CachedCrop], pairs: Sequence[Tuple[int, int]],
            settings: DistillationSettings, on_epoch: Optional[Callable[[DistillationHistory], None]] = None,
            ) -> Tuple[DistillationHistory, torch.optim.AdamW]:
    """Train the student encoder (on settings.device) in place towards the crops' teacher targets;
    `pairs` are the (student, teacher) block pairs of the layer-wise option in the order they join;
    on_epoch is called after every epoch."""
    device = torch.device(settings.device)
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    student.requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), settings.learning_rate, weight_decay=settings.weight_decay)
    dtype = torch.bfloat16 if settings.mixed_precision else torch.float32
    iterations = settings.iterations_per_epoch or len(crops)
    history = DistillationHistory()
    student.train()
    accumulation = GradientAccumulation(optimizer, settings.gradient_accumulation)
    for epoch in range(settings.max_epochs):
        started = time.perf_counter()
        active = active_pairs(pairs, epoch, settings.progressive_epochs)
        losses, necks = [], []
        for index in epoch_order(rng, len(crops), iterations):
            crop = crops[index]
            neck_target, block_targets = crop.targets([t for _, t in active], device)
            loss, neck_mse = student_loss(student, crop.volume(device), neck_target, block_targets, active, dtype)
            accumulation.backward(loss)
            losses.append(float(loss.detach()))
            necks.append(float(neck_mse))
        history.losses.append(float(np.mean(losses)))
        history.neck_mse.append(float(np.mean(necks)))
        history.depth_levels.append(len(active))
        history.seconds.append(time.perf_counter() - started)
        if on_epoch is not None:
            on_epoch(history)
    accumulation.finish()
    student.eval()
    return history, optimizer


# ---- the weights file ---------------------------------------------------------------------------------------------
def distilled_checkpoint(spec: ModelSpec, model: Sam, optimizer: torch.optim.Optimizer, history: DistillationHistory,
                         crops: Sequence[str], started_from: str, teacher: str) -> object:
    """The whole network in spec's official layout (FastSAM3D: weights under 'model_state_dict'),
    with this run's record next to them."""
    return official_layout(spec, model, optimizer, {
        "epoch": len(history.losses), "losses": list(history.losses), "neck_mse": list(history.neck_mse),
        "used_datas": list(crops), "started_from": started_from, "teacher": teacher})
