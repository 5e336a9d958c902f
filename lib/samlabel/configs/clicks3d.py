"""The 3D click models (FastSAM3D, SAM-Med3D-turbo): click segmentation and its uncertainty."""

from .base import SamTaskConfig


class Clicks3DConfig(SamTaskConfig):
    family = "clicks3d"
