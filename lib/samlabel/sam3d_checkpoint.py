"""SAM3D's three files, read safely, and the network built from them.

1. Meta's SAM ViT-B, `sam_vit_b_01ec64.pth`: a bare SAM state dict (image_encoder.*, prompt_encoder.*,
   mask_decoder.*). Only image_encoder.* is used, resized to the patch's in-plane size exactly as
   the official loader (segment_anything/build_sam.py, load_from) does.
2. The decoder, `model_final_checkpoint.model` / `model_best.model`: nnU-Net v1's training checkpoint,
   torch.save of {'epoch', 'state_dict', 'optimizer_state_dict', 'lr_scheduler_state_dict',
   'plot_stuff', 'best_stuff'[, 'amp_grad_scaler']} (network_trainer_*.py, save_checkpoint); the
   state dict holds the decoder and heads only. Read with torch.load(weights_only=True) and the
   allow-list of samlabel.checkpoint (the loss history holds numpy scalars).
3. The plans, `<same>.model.pkl`: a plain pickle of {'init': the trainer's arguments, 'name': its
   class name, 'class': str(class), 'plans': nnU-Net's plans} (Trainer_*.py, save_checkpoint). Read
   with PlansUnpickler, which rebuilds numpy arrays and scalars, OrderedDict and plain containers,
   and refuses any other global before it is called.

The plans (read_plans returns plans['plans'] as plain dicts, lists and tuples, numpy arrays kept,
numpy scalars as Python numbers). What code needs, and where the official code reads it:
  - plans_per_stage[stage]: the stage is the last key (run/default_configuration.py: 3d_fullres uses
    possible_stages[-1]; the SAM3D trainers take stage 1 of two, else 0):
      - 'patch_size': int array (D, H, W) in the transposed axis order. The SAM3D trainers (and for
        Synapse, ACDC and BraTS run/default_configuration.py) set it to their crop size before saving,
        so it is the size the model was trained at; the SAM encoder's img_size is patch_size[1]
        (sam3d.py: image_size[1]; H = W). A bare plans file of the preprocessing may differ: refused.
      - 'current_spacing': the target spacing in mm, transposed order (Trainer_*.preprocess_patient).
  - 'num_classes': foreground classes; the network has num_classes + 1 outputs (the trainers).
  - 'num_modalities': input channels, each encoded separately (BraTS: 4).
  - 'normalization_schemes': {channel: 'CT' | 'CT2' | 'nonCT' | ...}; 'use_mask_for_norm': {channel:
    bool} (preprocessing.py, GenericPreprocessor.resample_and_normalize).
  - 'dataset_properties'['intensityproperties'][channel]: 'mean', 'sd', 'percentile_00_5',
    'percentile_99_5' (CT: clip to the percentiles, subtract mean, divide by sd).
  - 'transpose_forward' / 'transpose_backward': axis permutations before / after the network; set to
    [0, 1, 2] when absent, as Trainer_*.process_plans does.
"""

import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, check_shapes, numpy_scalar, read_checkpoint
from .modeling.build_sam3d_seg import build_sam3d_seg
from .modeling.image_encoder import ImageEncoderViT
from .modeling.sam3d_decoder import SAM_FEATURES, Sam3DDecoder
from .modeling.sam3d_segmenter import PATCH, SAM3DSegmenter

try:
    from numpy._core.multiarray import _reconstruct as numpy_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as numpy_reconstruct

SAM_ENCODER_PREFIX = "image_encoder."
DECODER_KEYS = ("decoder5.conv1.0.weight", "out1.segmentation_head.weight")  # tell a SAM3D decoder, and its size
DATA_PARALLEL_PREFIX = "module."  # nn.DataParallel's; the official loader strips it where needed


# ---- the plans pickle -----------------------------------------------------------------------------

PLANS_GLOBALS = {
    **{(module, name): function for module in ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x, 2.x
       for name, function in (("_reconstruct", numpy_reconstruct), ("scalar", numpy_scalar))},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): OrderedDict,
    **{("builtins", kind.__name__): kind for kind in (set, frozenset, complex, bytearray)},  # pickled by reduction
}


class RefusedGlobal(pickle.UnpicklingError):
    """A global that PlansUnpickler does not rebuild; its args[0] is the global's name."""


class PlansUnpickler(pickle.Unpickler):
    """Unpickles plain data only: the globals of PLANS_GLOBALS. Any other (a function such as
    os.system, a class with its own reconstruction) raises RefusedGlobal when the pickle names it,
    before anything could call it."""

    def find_class(self, module: str, name: str):
        try:
            return PLANS_GLOBALS[module, name]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None


def _plain(value):
    """OrderedDicts as dicts and numpy scalars as Python numbers, all the way down; arrays kept."""
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value


def read_plans(path) -> dict:
    """The nnU-Net plans saved next to a SAM3D .model (its .model.pkl), checked for the entries
    that code needs (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            info = PlansUnpickler(f).load()
    except RefusedGlobal as error:
        raise CheckpointError(f"{path}: refused to unpickle: it contains {error.args[0]}, which is not plans data "
                              "(unpickling it could run code); the file was not loaded") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read: {error.strerror or error}") from None
    except Exception as error:  # noqa: BLE001 - whatever a damaged pickle fails with, the file is the problem
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file (0 bytes), not a plans pickle") from None
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: not a readable plans pickle (truncated, corrupt, or not a pickle): {reason}") from None
    if not (isinstance(info, Mapping) and isinstance(info.get("plans"), Mapping)):
        found = ", ".join(map(str, list(info)[:10])) if isinstance(info, Mapping) else type(info).__name__
        raise CheckpointError(f"{path}: not the .model.pkl saved with SAM3D weights: expected a dict with 'init', 'name' "
                              f"and 'plans', found: {found}")
    plans = _plain(info["plans"])
    _check_plans(plans, path)
    plans.setdefault("transpose_forward", [0, 1, 2])
    plans.setdefault("transpose_backward", [0, 1, 2])
    return plans


def _check_plans(plans: dict, path) -> None:
    needed = ("plans_per_stage", "num_classes", "num_modalities", "normalization_schemes", "use_mask_for_norm")
    missing = [k for k in needed if k not in plans]
    if not missing and not (isinstance(plans["plans_per_stage"], Mapping) and plans["plans_per_stage"]):
        missing = ["plans_per_stage (a stage)"]
    if not missing:
        missing = [f"plans_per_stage[...]['{k}']" for k in ("patch_size", "current_spacing") if k not in stage_plans(plans)]
    schemes = plans.get("normalization_schemes")
    ct = isinstance(schemes, Mapping) and {"CT", "CT2"} & set(schemes.values())
    if not missing and ct and "intensityproperties" not in plans.get("dataset_properties", {}):
        missing = ["dataset_properties['intensityproperties'] (CT normalisation needs it)"]
    if missing:
        raise CheckpointError(f"{path}: not nnU-Net plans: missing {', '.join(missing)}")


def stage_plans(plans: dict) -> dict:
    """plans_per_stage of the stage the official 3d_fullres trainers use: the last one."""
    return plans["plans_per_stage"][list(plans["plans_per_stage"])[-1]]


def network_arguments(plans: dict, path="plans") -> Dict[str, int]:
    """build_sam3d_seg's img_size, num_classes (with background) and num_modalities for these plans."""
    depth, height, width = (int(n) for n in stage_plans(plans)["patch_size"])
    if height != width or height % PATCH:
        raise CheckpointError(f"{path}: patch size {[depth, height, width]} is not one SAM3D runs at: its in-plane size "
                              f"must be square and a multiple of {PATCH}")
    return {"img_size": height, "num_classes": int(plans["num_classes"]) + 1, "num_modalities": int(plans["num_modalities"])}


# ---- Meta's SAM checkpoint: the slice encoder ------------------------------------------------------

def resize_sam_encoder_state(state: Dict[str, torch.Tensor], grid: int,
                             global_attn_indexes: Sequence[int]) -> Dict[str, torch.Tensor]:
    """The official load_from's resize of SAM's image encoder weights (keys without 'image_encoder.')
    to a grid x grid token grid. Only when pos_embed's grid differs: pos_embed bilinearly, and the
    global blocks' rel_pos_h/w tables (L, head_dim) as a 1-channel image to (2*grid - 1, head_dim),
    bilinear too; both align_corners=False, no antialiasing. Windowed blocks keep their tables."""
    if state["pos_embed"].shape[1] == grid:
        return dict(state)
    resized = dict(state)
    pos_embed = state["pos_embed"].permute(0, 3, 1, 2)
    resized["pos_embed"] = F.interpolate(pos_embed, (grid, grid), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    for index in global_attn_indexes:
        for key in (f"blocks.{index}.attn.rel_pos_h", f"blocks.{index}.attn.rel_pos_w"):
            if key in state:  # a missing one is named by the shape check
                table = state[key][None, None]
                resized[key] = F.interpolate(table, (2 * grid - 1, table.shape[-1]), mode="bilinear", align_corners=False)[0, 0]
    return resized


def global_blocks(encoder: ImageEncoderViT) -> Tuple[int, ...]:
    return tuple(i for i, block in enumerate(encoder.blocks) if not block.window_size)


def sam_encoder_state(checkpoint: object, encoder: ImageEncoderViT, path) -> Dict[str, torch.Tensor]:
    """The image encoder weights of a read SAM checkpoint (Meta's layout), resized to `encoder`'s size."""
    state = {}
    if isinstance(checkpoint, Mapping):
        state = {k[len(SAM_ENCODER_PREFIX):]: v for k, v in checkpoint.items()
                 if isinstance(k, str) and k.startswith(SAM_ENCODER_PREFIX) and isinstance(v, torch.Tensor)}
    if state.get("pos_embed", torch.empty(0)).ndim != 4:
        found = ", ".join(map(str, list(checkpoint)[:5])) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(f"{path}: not a SAM checkpoint (the layout of Meta's sam_vit_b_01ec64.pth): no "
                              f"{SAM_ENCODER_PREFIX}pos_embed; found: {found}")
    state = resize_sam_encoder_state(state, encoder.img_size // PATCH, global_blocks(encoder))
    check_shapes(state, {k: tuple(v.shape) for k, v in encoder.state_dict().items()}, "SAM ViT-B image encoder", path)
    return state


# ---- the .model checkpoint: the decoder ------------------------------------------------------------

def decoder_state(checkpoint: object, path) -> Dict[str, torch.Tensor]:
    """The decoder weights of a read .model: its 'state_dict', without nn.DataParallel's prefix."""
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not (isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        found = ", ".join(map(str, list(checkpoint)[:10])) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(f"{path}: not a SAM3D .model checkpoint: expected an entry 'state_dict' of weights, found: {found}")
    return {k.removeprefix(DATA_PARALLEL_PREFIX): v for k, v in state.items()}


def is_sam3d_model(checkpoint: object) -> bool:
    """Whether a read checkpoint is SAM3D's .model (nnU-Net layout, the SAM3D decoder's keys)."""
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    keys = {k.removeprefix(DATA_PARALLEL_PREFIX) for k in state if isinstance(k, str)} if isinstance(state, Mapping) else ()
    return all(k in keys for k in DECODER_KEYS)


def decoder_size(state: Mapping) -> Tuple[int, int]:
    """(num_modalities, num_classes) of a SAM3D decoder state dict, from its shapes."""
    first, head = (state[k] for k in DECODER_KEYS)
    return first.shape[1] // SAM_FEATURES, head.shape[0]


def check_decoder(state: Mapping, decoder: Sam3DDecoder, path) -> None:
    check_shapes(state, {k: tuple(v.shape) for k, v in decoder.state_dict().items()}, "SAM3D decoder", path)


# ---- the whole network ------------------------------------------------------------------------------

def plans_path_of(model_checkpoint) -> Path:
    """Where nnU-Net saves the plans of a .model: next to it, '.pkl' appended."""
    return Path(str(model_checkpoint) + ".pkl")


def load_sam3d(sam_checkpoint, model_checkpoint, plans_file=None, device="cpu", builder: Callable = build_sam3d_seg,
               **encoder_overrides) -> Tuple[SAM3DSegmenter, dict]:
    """SAM3D from its three files: Meta's SAM ViT-B (sam_vit_b_01ec64.pth), the decoder's .model and
    its plans (default: the .model.pkl next to it). Returns (model in float32 and eval mode on
    `device`, plans). builder (a registry entry's) and encoder_overrides (embed_dim, depth, num_heads,
    global_attn_indexes) give small test configurations."""
    plans_file = Path(plans_file) if plans_file else plans_path_of(model_checkpoint)
    plans = read_plans(plans_file)
    with torch.device("meta"):  # no random init: every tensor comes from the files
        model = builder(**network_arguments(plans, plans_file), **encoder_overrides)
    decoder = decoder_state(read_checkpoint(model_checkpoint), model_checkpoint)
    check_decoder(decoder, model.decoder, model_checkpoint)
    encoder = sam_encoder_state(read_checkpoint(sam_checkpoint), model.image_encoder, sam_checkpoint)
    for module, state in ((model.image_encoder, encoder), (model.decoder, decoder)):
        module.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval(), plans
