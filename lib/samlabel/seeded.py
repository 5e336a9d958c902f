"""Seeded random weights and inputs for tests, benchmarks and reference data.

Real checkpoints cannot be downloaded where this project is tested, so tests build
state dicts from a seed with one fixed rule that depends only on each key's name and
shape. The rule gives every parameter a non-trivial value (relative-position tables,
positional embeddings and biases are non-zero), so a test exercises every term.
"""

import math
from pathlib import Path
from typing import Dict

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


def write_seeded_checkpoints(folder, seeds: Dict[str, int]) -> Dict[str, Path]:
    """Seeded full-size checkpoints (model name -> seed), each with its model's official file name
    and layout, in folder; their paths by model name."""
    from .checkpoint import expected_shapes
    from .registry import get_spec

    paths = {}
    for name, seed in seeds.items():
        spec = get_spec(name)
        paths[name] = Path(folder) / spec.checkpoint_file
        save_in_official_layout(spec, seeded_state_dict(expected_shapes(spec), seed), paths[name])
    return paths


def seeded_image(seed: int, size: int = 256) -> torch.Tensor:
    """A (1, 3, size, size) float32 image, all channels equal: smooth blobs plus noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 1, 16, 16), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noise = 0.1 * torch.randn((1, 1, size, size), generator=generator)
    return (smooth + noise).float().repeat(1, 3, 1, 1)


def seeded_sam_state_dict(seed: int, **encoder_overrides) -> dict:
    """A SAM state dict in the layout of Meta's sam_vit_b_01ec64.pth (image_encoder.* at 1024^2, i.e. a
    64x64 pos_embed, prompt_encoder.*, mask_decoder.*). encoder_overrides (embed_dim, depth,
    num_heads, global_attn_indexes) give a small ViT with the same structure."""
    from .modeling import build_sam2d

    with torch.device("meta"):
        sam = build_sam2d(img_size=1024, **encoder_overrides)
    return seeded_state_dict({name: t.shape for name, t in sam.state_dict().items()}, seed)


def nnunet_training_checkpoint(state_dict: dict) -> dict:
    """A `.model` file's content as nnU-Net v1's trainer saves it (SAM3D's network_trainer_*.py):
    the weights under 'state_dict', SGD's momentum buffers, the loss history as numpy scalars."""
    import numpy as np

    losses = [np.float64(-0.2 - 0.01 * i) for i in range(3)]
    return {
        "epoch": 1000,
        "state_dict": state_dict,
        "optimizer_state_dict": {
            "state": {i: {"momentum_buffer": torch.zeros_like(t)} for i, t in enumerate(state_dict.values())},
            "param_groups": [{"lr": 1e-5, "momentum": 0.99, "dampening": 0, "weight_decay": 3e-5, "nesterov": True,
                              "maximize": False, "foreach": None, "differentiable": False,
                              "params": list(range(len(state_dict)))}],
        },
        "lr_scheduler_state_dict": None,  # poly learning rate set by hand: no scheduler
        "plot_stuff": (losses, losses, [], [np.float64(0.8 + 0.01 * i) for i in range(3)]),
        "best_stuff": (998, np.float64(-0.22), np.float64(0.82)),
        "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                            "_growth_tracker": 17},
    }


def nnunet_plans_info(num_classes: int, num_modalities: int = 1, patch_size=(64, 176, 176),
                      spacing=(3.0, 0.76, 0.76)):
    """A `.model.pkl`'s content as nnU-Net v1 / nnFormer trainers pickle it: {'init', 'name', 'class',
    'plans'} with numpy arrays and scalars and OrderedDicts inside (a Synapse-like single-stage
    3d_fullres plan). num_classes includes the background, as the network's outputs do."""
    from collections import OrderedDict

    import numpy as np

    channels = range(num_modalities)
    scheme = "CT" if num_modalities == 1 else "nonCT"
    intensity = OrderedDict((c, OrderedDict([
        ("median", np.float64(80.0 + c)), ("mean", np.float64(79.5 + c)), ("sd", np.float64(138.6 + c)),
        ("mn", np.float64(-1024.0)), ("mx", np.float64(3071.0)), ("percentile_99_5", np.float64(304.0 + c)),
        ("percentile_00_5", np.float64(-958.0 - c)), ("local_props", OrderedDict()),
    ])) for c in channels)
    stage = {
        "batch_size": 2, "num_pool_per_axis": [3, 5, 5], "patch_size": np.array(patch_size),
        "median_patient_size_in_voxels": np.array([148, 512, 512]), "current_spacing": np.array(spacing, dtype=float),
        "original_spacing": np.array(spacing, dtype=float), "do_dummy_2D_data_aug": True,
        "pool_op_kernel_sizes": [[1, 2, 2]] * 3, "conv_kernel_sizes": [[3, 3, 3]] * 4,
    }
    plans = {
        "num_stages": 1, "num_modalities": num_modalities, "modalities": {c: scheme for c in channels},
        "normalization_schemes": OrderedDict((c, scheme) for c in channels),
        "dataset_properties": {"all_classes": list(range(1, num_classes)), "modalities": {c: scheme for c in channels},
                               "intensityproperties": intensity, "all_spacings": [np.array(spacing)],
                               "all_sizes": [np.array([148, 512, 512])]},
        "plans_per_stage": {0: stage}, "original_spacings": [np.array(spacing)], "original_sizes": [np.array([148, 512, 512])],
        "preprocessed_data_folder": "/data/nnFormer_preprocessed/Task002_Synapse", "num_classes": num_classes - 1,
        "all_classes": list(range(1, num_classes)), "base_num_features": 32,
        "use_mask_for_norm": OrderedDict((c, False) for c in channels), "keep_only_largest_region": None,
        "min_region_size_per_class": None, "min_size_per_class": None, "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2], "data_identifier": "nnFormerData_plans_v2.1",
        "preprocessor_name": "GenericPreprocessor", "conv_per_stage": 2,
    }
    trainer = "sam3d_trainer_synapse"
    return OrderedDict([
        ("init", ("/data/Task002_Synapse/nnFormerPlansv2.1_plans_3D.pkl", 0, f"/results/{trainer}/fold_0",
                  "/data/Task002_Synapse", True, 0, True, True, False, "vit_b", "/ckpt/sam_vit_b_01ec64.pth")),
        ("name", trainer),
        ("class", f"<class 'sam3d.training.network_training.{trainer}.{trainer}'>"),
        ("plans", plans),
    ])


def save_sam3d_decoder_files(path, state_dict: dict, num_modalities: int = 1, patch_size=(64, 176, 176),
                             spacing=(3.0, 0.76, 0.76)) -> None:
    """Save a SAM3D decoder as its official files: `path` (the .model, torch.save) and `path`.pkl
    (the plans, plain pickle); the plans' classes and modalities are the decoder's."""
    import pickle

    num_classes = state_dict["out1.segmentation_head.weight"].shape[0]
    torch.save(nnunet_training_checkpoint(state_dict), path)
    with open(f"{path}.pkl", "wb") as f:
        pickle.dump(nnunet_plans_info(num_classes, num_modalities, patch_size, spacing), f)
