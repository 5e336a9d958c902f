"""Seeded SAM3D model folders for training tests and benchmarks: Meta's SAM layout (a small ViT),
an official-format decoder and plans, and a registry entry that builds the small network."""

import functools
import pickle
from pathlib import Path
from typing import Dict, Sequence, Tuple

import torch

from .engine_auto import AutoSegmentationEngine
from .images import ImageCache
from .modeling.build_sam3d_seg import build_sam3d_seg
from .modeling.sam3d_decoder import Sam3DDecoder
from .registry import ModelSpec
from .seeded import nnunet_plans_info, nnunet_training_checkpoint, seeded_sam_state_dict, seeded_state_dict

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,)}
ENCODER_FILE = "sam_vit_seeded.pth"


def seeded_sam3d_engine(root, name: str, labels: Dict[str, int], patch_size: Sequence[int],
                        spacing: Tuple[float, float, float], scheme: str = "CT", vit: Dict = TINY_VIT,
                        seed: int = 0, modalities: int = 1) -> AutoSegmentationEngine:
    """Write `root`/ENCODER_FILE and `root`/<name>/model_final_checkpoint.model(.pkl) (classes: the
    labels' largest id + background; plans with this patch, target spacing (network order),
    modalities and normalisation scheme) and return the engine serving them on the CPU."""
    root = Path(root)
    (root / name).mkdir(parents=True)
    torch.save(seeded_sam_state_dict(seed, **vit), root / ENCODER_FILE)
    decoder = root / name / "model_final_checkpoint.model"
    num_classes = max(labels.values()) + 1
    shapes = {k: v.shape for k, v in Sam3DDecoder(num_classes, modalities).state_dict().items()}
    torch.save(nnunet_training_checkpoint(seeded_state_dict(shapes, seed + 1)), decoder)
    info = nnunet_plans_info(num_classes, modalities, patch_size=tuple(patch_size), spacing=spacing)
    for channel in range(modalities):
        info["plans"]["normalization_schemes"][channel] = scheme
    with open(f"{decoder}.pkl", "wb") as f:
        pickle.dump(info, f)
    spec = ModelSpec(name=name, title=f"SAM3D ({name}, seeded)", family="auto3d",
                     builder=functools.partial(build_sam3d_seg, **vit), engine=AutoSegmentationEngine, prompt=None,
                     preprocess=None, input_size=tuple(patch_size), checkpoint_file=f"{name}/model_final_checkpoint.model",
                     checkpoint_key="state_dict", source="seeded files", labels=dict(labels),
                     encoder_checkpoint_file=ENCODER_FILE, tasks=("segmentation", "training"))
    return AutoSegmentationEngine(spec, decoder, ImageCache(), device="cpu", encoder_checkpoint=root / ENCODER_FILE)
