"""SAM3D's 3D decoder (UARK-AICV/SAM3D, sam3d/network_architecture/sam3d.py): the part of the network
its `.model` checkpoints hold.

Four residual blocks take the stacked slice features (256 per modality, 1/16 in-plane resolution)
back to full resolution, each upsampling x2 in-plane only; three heads give logits at full, 1/2
and 1/4 in-plane resolution (out1, out2, out3). Module and parameter names are the official ones,
so the official state dict (36 keys, decoder and heads only) loads with strict=True. There are no
skip connections from the encoder. InstanceNorm3d is the official default: no affine parameters,
no running statistics.
"""

from typing import List, Union

import torch
from torch import nn

SAM_FEATURES = 256  # channels of one modality's SAM encoder output (the official prompt_embed_dim)


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int, activation: bool) -> nn.Sequential:
    layers = [nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2), nn.InstanceNorm3d(out_channels)]
    return nn.Sequential(*layers, nn.LeakyReLU()) if activation else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Conv-norm-LeakyReLU, conv-norm, plus a 1^3 conv-norm shortcut; LeakyReLU; x2 in-plane upsampling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_norm(in_channels, out_channels, 3, activation=True)
        self.conv2 = _conv_norm(out_channels, out_channels, 3, activation=False)
        self.downsample = _conv_norm(in_channels, out_channels, 1, activation=False)  # the shortcut (official name)
        self.leakyrelu = nn.LeakyReLU()
        self.up = nn.Upsample(scale_factor=(1, 2, 2), mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.leakyrelu(self.conv2(self.conv1(x)) + self.downsample(x)))


class SegmentationHead(nn.Module):
    """Conv-norm-LeakyReLU to half the channels, then a 1^3 conv to the classes."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv_pred = _conv_norm(in_channels, in_channels // 2, 3, activation=True)
        self.segmentation_head = nn.Conv3d(in_channels // 2, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.conv_pred(x))


class Sam3DDecoder(nn.Module):
    def __init__(self, num_classes: int, num_modalities: int = 1) -> None:
        super().__init__()
        self.decoder5 = BasicBlock(SAM_FEATURES * num_modalities, 128)
        self.decoder4 = BasicBlock(128, 64)
        self.decoder3 = BasicBlock(64, 32)
        self.decoder2 = BasicBlock(32, 16)
        self.out1 = SegmentationHead(16, num_classes)
        # Deep-supervision heads: always built (the official trainers build with do_ds=True, so every
        # .model holds them), run only when asked.
        self.out3 = SegmentationHead(64, num_classes)
        self.out2 = SegmentationHead(32, num_classes)

    def forward(self, features: torch.Tensor, deep_supervision: bool = False) -> Union[torch.Tensor, List[torch.Tensor]]:
        """features (B, 256*M, D, h, w) -> logits (B, C, D, 16h, 16w); with deep_supervision the list
        [out1, out2 (B, C, D, 8h, 8w), out3 (B, C, D, 4h, 4w)] in the official order."""
        dec4 = self.decoder4(self.decoder5(features))
        dec3 = self.decoder3(dec4)
        logits = self.out1(self.decoder2(dec3))
        return [logits, self.out2(dec3), self.out3(dec4)] if deep_supervision else logits
