"""Builder of SAM3D: SAM ViT-B slice encoder at the patch's in-plane size + SAM3D's 3D decoder.
Keyword overrides give smaller test configurations with the same structure."""

from typing import Sequence

from .image_encoder import ImageEncoderViT
from .sam3d_decoder import SAM_FEATURES, Sam3DDecoder
from .sam3d_segmenter import SAM3DSegmenter


def build_sam3d_seg(img_size: int, num_classes: int, num_modalities: int = 1, embed_dim: int = 768, depth: int = 12,
                    num_heads: int = 12, window_size: int = 14, global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
                    slices_per_batch: int = 32) -> SAM3DSegmenter:
    """img_size: the patch's in-plane size (Synapse 176, ACDC 160, Lung 192); num_classes includes
    background (the plans' num_classes + 1); num_modalities: the plans' num_modalities (BraTS 4)."""
    encoder = ImageEncoderViT(img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                              out_chans=SAM_FEATURES, window_size=window_size, global_attn_indexes=global_attn_indexes)
    return SAM3DSegmenter(encoder, Sam3DDecoder(num_classes, num_modalities), slices_per_batch).eval()
