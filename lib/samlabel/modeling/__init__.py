from .build_sam2d import build_medsam, build_sam2d, build_sam_med2d
from .build_sam3d import build_fastsam3d, build_sam3d, build_sam_med3d_turbo
from .sam import Sam

__all__ = ["Sam", "build_sam3d", "build_fastsam3d", "build_sam_med3d_turbo", "build_sam2d", "build_medsam", "build_sam_med2d"]
