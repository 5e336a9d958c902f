from .build_sam3d import build_fastsam3d, build_sam3d, build_sam_med3d_turbo
from .sam3d import Sam3D

__all__ = ["Sam3D", "build_sam3d", "build_fastsam3d", "build_sam_med3d_turbo"]
