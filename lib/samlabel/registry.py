"""The model registry, timm-style: one entry per model says everything code needs about it.

    register_model(ModelSpec(name=..., builder=..., engine=..., prompt=..., preprocess=..., ...))

Adding a model is an entry (samlabel/models.py, or a test double's own file) and its builder.
The app serves every entry through the TaskConfig of its `family` (samlabel/configs), which
makes the engine named here and one MONAI Label task per entry of `tasks`.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from torch import nn

TASK_KINDS = ("clicks", "uncertainty", "propagation", "segmentation", "training")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # task name in MONAI Label and key of --conf options
    title: str
    family: str  # which TaskConfig serves it: "clicks3d", "slices2d", "auto3d"
    builder: Callable[..., nn.Module]
    engine: type  # the engine class that serves it (engine.ClickEngine, engine_auto.AutoSegmentationEngine)
    prompt: Optional[object]  # prompts.PointPrompt / prompts.BoxPrompt: how it takes prompts and varies them
    preprocess: Optional[Callable]  # 3D: the window's intensity normalisation; 2D: the 0-255 slice -> encoder input
    input_size: Tuple[int, ...]  # model input in voxels / pixels (automatic models: the official patch)
    checkpoint_file: str  # official file name, looked up in the app's model/ folder
    checkpoint_key: Optional[str]  # entry of the checkpoint dict holding the state dict (None: the file is one)
    source: str  # where users download the checkpoint
    spacing_mm: Optional[float] = None  # 3D: isotropic spacing of the model window
    # 3D: where the window goes (geometry.place_window): "clicks" centres it on the clicks, "official"
    # puts it on the official pipeline's 1.5 mm grid with TorchIO CropOrPad's rounding
    window_grid: str = "clicks"
    tasks: Tuple[str, ...] = ("clicks", "uncertainty")  # the MONAI Label tasks it is served as (TASK_KINDS)
    # 2D: the official inference code's mask, f(low-res logits (S, L, L), columns, rows, input_size=...)
    # -> bool (S, columns, rows) on the slice's pixels (samlabel.engine2d: medsam_masks, sam_med2d_masks)
    mask_postprocess: Optional[Callable] = None
    # Where scripts/fetch_checkpoints.py gets the official file (`make serve`; the app never downloads):
    hf_repo: Optional[str] = None  # Hugging Face model repo that publishes it, e.g. "techlove/FastSAM3D"
    hf_filename: Optional[str] = None  # its path in hf_repo (None: checkpoint_file)
    hf_revision: str = "main"  # branch, tag or commit of hf_repo
    download_page: Optional[str] = None  # no library fetches it (Google Drive): the page a person downloads it from
    # Automatic models: label name -> the network's output class (upstream ids; other classes are left out)
    labels: Optional[Dict[str, int]] = None
    # SAM3D: the frozen 2D encoder's own checkpoint (Meta's SAM ViT-B), shared by its entries
    encoder_checkpoint_file: Optional[str] = None


MODELS: Dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    unknown = set(spec.tasks) - set(TASK_KINDS)
    if unknown:
        raise ValueError(f"{spec.name}: unknown task kinds {sorted(unknown)}; known: {', '.join(TASK_KINDS)}")
    MODELS[spec.name] = spec
    return spec


def registered() -> Dict[str, ModelSpec]:
    from . import models  # noqa: F401 - registers the built-in models on first use

    return MODELS


def get_spec(name: str) -> ModelSpec:
    try:
        return registered()[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(registered())}") from None
