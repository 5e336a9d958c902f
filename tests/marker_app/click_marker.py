"""The test-double 3D model ``click_marker``: a network that marks a ball of RADIUS model
voxels (1.5 mm each) around the newest positive point prompt, in the official SAM-Med3D
interfaces, so the real engine (window, resampling, read-back) serves it. Importing this file
registers nothing; tests/marker_app/main.py registers it."""

import torch
from torch import nn

from samlabel.models import SAM_MED3D_INPUT
from samlabel.registry import ModelSpec

RADIUS = 8.0  # model voxels
SATURATION = 2.0  # logits are clipped to +-SATURATION, as a trained model's saturate away from edges


class _Encoder(nn.Module):
    img_size = SAM_MED3D_INPUT["input_size"][0]

    def forward(self, volume):
        return volume.new_zeros(volume.shape[0], 1, 1, 1, 1)


class _PromptEncoder(nn.Module):
    def forward(self, points_labels, mask_input):
        points, labels = points_labels
        return torch.cat([points, labels[..., None].float()], dim=-1), torch.zeros(1)

    def get_dense_pe(self):
        return torch.zeros(1)


class _MarkerDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.radius = nn.Parameter(torch.tensor(RADIUS))

    def forward(self, embedding, dense_pe, sparse, dense, multimask_output=False):
        """Low-res logits radius - distance to the newest positive point, in model voxels, clipped
        (so ensemble members agree away from their edges): the official 4x trilinear upsampling
        maps low-res cell c to model voxel 4c + 1.5."""
        points, labels = sparse[..., :3], sparse[..., 3]
        newest = (labels > 0).float().cumsum(-1).argmax(-1)  # index of the last positive point
        centre = points[torch.arange(len(points)), newest]  # (B, 3)
        low_res = SAM_MED3D_INPUT["input_size"][0] // 4
        cells = torch.stack(torch.meshgrid(*[torch.arange(low_res, dtype=torch.float32)] * 3, indexing="ij"), -1)
        distance = (cells[None] * 4 + 1.5 - centre[:, None, None, None]).norm(dim=-1)
        logits = (self.radius - distance).clamp(-SATURATION, SATURATION)[:, None]
        return logits, torch.ones(len(points), 1)


class ClickMarker(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_encoder, self.prompt_encoder, self.mask_decoder = _Encoder(), _PromptEncoder(), _MarkerDecoder()


SPEC = ModelSpec(name="click_marker", title="Click marker (test double)", builder=ClickMarker,
                 checkpoint_file="click_marker.pth", source="tests/marker_app/click_marker.py", **SAM_MED3D_INPUT)


def write_checkpoint(path) -> None:
    """click_marker.pth in the official training-script layout."""
    torch.save({"model_state_dict": {"mask_decoder.radius": torch.tensor(RADIUS)}}, path)
