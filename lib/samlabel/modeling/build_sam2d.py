"""Builders for the 2D models: SAM ViT-B (MedSAM's checkpoint layout) and SAM-Med2D (256^2 with
adapters). Keyword overrides give smaller test configurations with the same structure."""

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam


def build_sam2d(img_size: int, embed_dim: int = 768, depth: int = 12, num_heads: int = 12, window_size: int = 14,
                global_attn_indexes=(2, 5, 8, 11), prompt_dim: int = 256, adapter: bool = False,
                decoder_mlp_dim: int = 2048, iou_head_hidden_dim: int = 256) -> Sam:
    grid = img_size // 16
    encoder = ImageEncoderViT(img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, out_chans=prompt_dim,
                              window_size=window_size, global_attn_indexes=global_attn_indexes, adapter=adapter)
    prompt_encoder = PromptEncoder(prompt_dim, (grid, grid), (img_size, img_size), mask_in_chans=16)
    decoder = MaskDecoder(prompt_dim, spatial_dims=2, transformer_mlp_dim=decoder_mlp_dim, iou_head_hidden_dim=iou_head_hidden_dim)
    return Sam(encoder, prompt_encoder, decoder).eval()


def build_medsam(**overrides) -> Sam:
    """MedSAM: Meta's SAM ViT-B at 1024^2 (checkpoint medsam_vit_b.pth, a bare SAM state dict)."""
    return build_sam2d(**{"img_size": 1024, **overrides})


def build_sam_med2d(**overrides) -> Sam:
    """SAM-Med2D: SAM ViT-B at 256^2 with an adapter in every block (sam-med2d_b.pth, under 'model')."""
    return build_sam2d(**{"img_size": 256, "adapter": True, **overrides})
