"""The 2D models (MedSAM, SAM-Med2D): slice segmentation, its uncertainty, and propagation to 3D."""

from .base import SamTaskConfig


class Slices2DConfig(SamTaskConfig):
    family = "slices2d"
