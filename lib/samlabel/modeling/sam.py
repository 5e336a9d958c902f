from torch import nn


class Sam(nn.Module):
    """Container with the official top-level names: image_encoder, prompt_encoder, mask_decoder."""

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
