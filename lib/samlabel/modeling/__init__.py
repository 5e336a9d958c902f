from .build_sam2d import build_medsam, build_sam2d, build_sam_med2d
from .build_sam3d import build_fastsam3d, build_sam3d, build_sam_med3d_turbo
from .build_sam3d_seg import build_sam3d_seg
from .sam import Sam
from .sam3d_segmenter import SAM3DSegmenter

__all__ = ["Sam", "build_sam3d", "build_fastsam3d", "build_sam_med3d_turbo", "build_sam2d", "build_medsam", "build_sam_med2d",
           "build_sam3d_seg", "SAM3DSegmenter"]
