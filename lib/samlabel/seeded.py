"""Seeded random weights and inputs for tests, benchmarks and reference data.

Real checkpoints cannot be downloaded where this project is tested, so tests build
state dicts from a seed with one fixed rule that depends only on each key's name and
shape. The rule gives every parameter a non-trivial value (relative-position tables,
positional embeddings and biases are non-zero), so a test exercises every term.
"""

import math

import torch


def _scale(name: str, shape: tuple) -> tuple:
    """Return (mean, std) for the values of one state-dict entry."""
    if name.endswith("positional_encoding_gaussian_matrix"):
        return 0.0, 1.0
    if "rel_pos" in name or name.endswith("pos_embed"):
        return 0.0, 0.5
    if len(shape) == 1:
        # 1-D weights are normalisation scales; everything else 1-D is a bias.
        return (1.0, 0.1) if name.endswith("weight") else (0.0, 0.1)
    return 0.0, 1.0 / math.sqrt(math.prod(shape[1:]))


def seeded_state_dict(shapes, seed: int) -> dict:
    """A state dict for `shapes` ({name: shape}), drawn in sorted-name order from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        mean, std = _scale(name, shape)
        state[name] = mean + std * torch.randn(shape, generator=generator)
    return state


def seeded_volume(seed: int, size: int = 128) -> torch.Tensor:
    """A (1, 1, size, size, size) float32 volume: smooth blobs plus noise, non-symmetric."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 1, 8, 8, 8), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)
    noise = 0.1 * torch.randn((1, 1, size, size, size), generator=generator)
    return (smooth + noise).float()


def training_checkpoint(state_dict: dict) -> dict:
    """A checkpoint laid out as the official training scripts save it (SAM-Med3D's train.py,
    FastSAM3D's distillation.py): the weights under 'model_state_dict' next to training state,
    including the pickled argparse.Namespace under 'args' that FastSAM3D.pth carries."""
    import argparse
    import collections

    import numpy as np

    return {
        "epoch": 84,
        "model_state_dict": state_dict,
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 8e-4, "weight_decay": 0.1, "params": [0, 1]}]},
        "lr_scheduler_state_dict": {"milestones": collections.Counter({120: 1, 180: 1}), "gamma": 0.1, "last_epoch": 84},
        "losses": [np.float64(0.41), np.float64(0.37)],
        "best_loss": np.float64(0.37),
        "args": argparse.Namespace(model_type="vit_b_ori", checkpoint="./work_dir/SAM/sam_med3d_oringin.pth", lr=8e-4),
        "used_datas": ["./data/train/ct_AMOS"],
    }


def save_in_official_layout(spec, state_dict: dict, path) -> None:
    """Save weights laid out as spec's official checkpoint file: the training-script dict for the
    3D models (weights under 'model_state_dict'), {checkpoint_key: weights} or the bare state
    dict for the 2D ones."""
    if spec.checkpoint_key == "model_state_dict":
        checkpoint = training_checkpoint(state_dict)
    else:
        checkpoint = {spec.checkpoint_key: state_dict} if spec.checkpoint_key else state_dict
    torch.save(checkpoint, path)


def seeded_image(seed: int, size: int = 256) -> torch.Tensor:
    """A (1, 3, size, size) float32 image, all channels equal: smooth blobs plus noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 1, 16, 16), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noise = 0.1 * torch.randn((1, 1, size, size), generator=generator)
    return (smooth + noise).float().repeat(1, 3, 1, 1)
