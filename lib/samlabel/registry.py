"""One place that says, per model: architecture, input, preprocessing and checkpoint.

Adding a model is adding an entry here (and its builder), not touching the engine.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from torch import nn

from .modeling import build_fastsam3d, build_medsam, build_sam_med2d, build_sam_med3d_turbo


@dataclass(frozen=True)
class ModelSpec:
    name: str  # task name in MONAI Label and key of --conf options
    title: str
    builder: Callable[..., nn.Module]
    dimension: int  # 3: volumetric clicks; 2: slice by slice
    input_size: Tuple[int, ...]  # model input in voxels
    spacing_mm: Optional[float]  # isotropic spacing the model was trained at
    orientation: str  # orientation of the model input (NIfTI axis codes)
    intensity: str  # how intensities are normalised before the encoder
    checkpoint_file: str  # official file name, looked up in the app's model/ folder
    checkpoint_key: Optional[str]  # entry of the checkpoint dict holding the state dict (None: the file is one)
    source: str  # where users download the checkpoint
    prompt: str = "points"  # 2D models: "box" (MedSAM), "point" (MedSAM's point-prompt decoder), "points" (SAM-Med2D)
    preprocess: Optional[str] = None  # 2D models: key of samlabel.slices.PREPROCESS


# What both 3D click models share: the official SAM-Med3D input pipeline and checkpoint layout.
SAM_MED3D_INPUT = dict(
    dimension=3,
    input_size=(128, 128, 128),
    spacing_mm=1.5,
    orientation="RAS",
    intensity="z-score over voxels > 0 of the 128^3 crop",
    checkpoint_key="model_state_dict",
)

MODELS: Dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(name="fastsam3d", title="FastSAM3D", builder=build_fastsam3d, checkpoint_file="FastSAM3D.pth",
                  source="https://huggingface.co/techlove/FastSAM3D (FastSAM3D.pth)", **SAM_MED3D_INPUT),
        ModelSpec(name="sam_med3d", title="SAM-Med3D-turbo", builder=build_sam_med3d_turbo,
                  checkpoint_file="sam_med3d_turbo.pth",
                  source="https://huggingface.co/blueyo0/SAM-Med3D (sam_med3d_turbo.pth)", **SAM_MED3D_INPUT),
        ModelSpec(name="medsam", title="MedSAM", builder=build_medsam, dimension=2, input_size=(1024, 1024),
                  spacing_mm=None, orientation="stored slice", checkpoint_file="medsam_vit_b.pth", checkpoint_key=None,
                  intensity="CT window 40/400 or MR 0.5-99.5 percentiles to 0-255, bicubic to 1024^2, min-max to [0, 1]",
                  source="https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN (medsam_vit_b.pth)",
                  prompt="box", preprocess="medsam"),
        ModelSpec(name="medsam_point", title="MedSAM (point prompt)", builder=build_medsam, dimension=2,
                  input_size=(1024, 1024), spacing_mm=None, orientation="stored slice",
                  checkpoint_file="medsam_point_prompt_flare22.pth", checkpoint_key=None,
                  intensity="as MedSAM", prompt="point", preprocess="medsam",
                  source="MedSAM extensions/point_prompt (medsam_point_prompt_flare22.pth, FLARE22 only, experimental)"),
        ModelSpec(name="sam_med2d", title="SAM-Med2D", builder=build_sam_med2d, dimension=2, input_size=(256, 256),
                  spacing_mm=None, orientation="stored slice", checkpoint_file="sam-med2d_b.pth", checkpoint_key="model",
                  intensity="0-255 as MedSAM, SAM pixel mean/std, nearest resize to 256^2",
                  source="https://github.com/OpenGVLab/SAM-Med2D (sam-med2d_b.pth)", preprocess="sam_med2d"),
    )
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None
