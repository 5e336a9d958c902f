"""samlabel: medical Segment-Anything models (FastSAM3D, SAM-Med3D-turbo) for MONAI Label."""

__version__ = "0.1.0"
