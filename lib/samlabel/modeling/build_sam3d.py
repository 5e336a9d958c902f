"""Builders for the released 3D models. Keyword overrides give smaller test configurations
with the same quirks (the token grid, windows, FFN-only blocks and block arithmetic stay)."""

from typing import Optional, Sequence, Tuple

from .image_encoder3d import ImageEncoderViT3D
from .mask_decoder import MaskDecoder
from .prompt_encoder3d import PromptEncoder3D
from .sam import Sam


def build_sam3d(
    embed_dim: int,
    depth: int,
    num_heads: int,
    window_size: int,
    global_attn_indexes: Sequence[int],
    ffn_only_blocks: int = 0,
    norm2_replaces_residual: bool = False,
    prompt_dim: int = 384,
    img_size: int = 128,
    patch_size: int = 16,
    sparse_attention: Optional[Tuple[int, int]] = None,
) -> Sam:
    grid = img_size // patch_size
    encoder = ImageEncoderViT3D(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        out_chans=prompt_dim,
        window_sizes=[0 if i in global_attn_indexes else window_size for i in range(depth)],
        ffn_only_blocks=ffn_only_blocks,
        norm2_replaces_residual=norm2_replaces_residual,
        sparse_attention=sparse_attention,
    )
    prompt_encoder = PromptEncoder3D(prompt_dim, (grid,) * 3, (img_size,) * 3, mask_in_chans=16)
    return Sam(encoder, prompt_encoder, MaskDecoder(prompt_dim, spatial_dims=3)).eval()


def build_sam_med3d_turbo(**overrides) -> Sam:
    """SAM-Med3D(-turbo), official builder `vit_b_ori`: window 14 except global blocks 2, 5, 8, 11."""
    config = dict(embed_dim=768, depth=12, num_heads=12, window_size=14, global_attn_indexes=(2, 5, 8, 11))
    return build_sam3d(**{**config, **overrides})


def build_fastsam3d(**overrides) -> Sam:
    """FastSAM3D's released student: 6 global blocks x 6 heads, blocks 0-1 FFN-only,
    LayerNorm-2 output replacing the residual stream."""
    config = dict(embed_dim=768, depth=6, num_heads=6, window_size=0, global_attn_indexes=(),
                  ffn_only_blocks=2, norm2_replaces_residual=True)
    return build_sam3d(**{**config, **overrides})
