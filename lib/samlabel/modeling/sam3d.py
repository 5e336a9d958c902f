from torch import nn

from .image_encoder3d import ImageEncoderViT3D
from .mask_decoder3d import MaskDecoder3D
from .prompt_encoder3d import PromptEncoder3D


class Sam3D(nn.Module):
    """Container with the official top-level names: image_encoder, prompt_encoder, mask_decoder."""

    def __init__(self, image_encoder: ImageEncoderViT3D, prompt_encoder: PromptEncoder3D, mask_decoder: MaskDecoder3D):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
