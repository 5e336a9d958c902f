"""The engines on CUDA, in float32 and bfloat16: a 3D click, a 2D click and an uncertainty click.
Skipped without CUDA (CI has none); bench/gpu_check.sh covers the same path with timings."""

import numpy as np
import pytest
import torch

from samlabel.engine2d import SliceSegmenter
from samlabel.engine3d import ClickSegmenter3D
from samlabel.modeling import build_fastsam3d, build_sam_med2d
from samlabel.predictor import SamPredictor3D
from samlabel.predictor2d import SamPredictor2D
from samlabel.registry import get_spec
from samlabel.request import ClickRequest
from samlabel.seeded import seeded_state_dict
from test_engine import volume_path  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def seeded(model):
    model.load_state_dict(seeded_state_dict({k: v.shape for k, v in model.state_dict().items()}, 3))
    return model


@pytest.fixture(scope="module")
def models():
    return (seeded(build_fastsam3d(embed_dim=48, depth=3, num_heads=2, prompt_dim=48)),
            seeded(build_sam_med2d(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), prompt_dim=32)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_3d_2d_and_uncertainty_clicks_on_cuda_agree_with_the_cpu(volume_path, models, dtype):  # noqa: F811
    model3d, model2d = models
    click = ClickRequest(foreground=((150, 130, 20),), client="cuda")
    masks = {}
    for device in ("cpu", "cuda"):
        engine3d = ClickSegmenter3D(get_spec("fastsam3d"), device=device, dtype=dtype,
                                    predictor=SamPredictor3D(model3d.to(device), dtype))
        spec2d = get_spec("sam_med2d")
        engine2d = SliceSegmenter(spec2d, device=device, dtype=dtype,
                                  predictor=SamPredictor2D(model2d.to(device), spec2d.preprocess, dtype))
        plain = engine3d.segment(volume_path, click)
        ensembled = engine3d.segment(volume_path, ClickRequest(foreground=((150, 130, 20), (151, 130, 20)), client="cuda",
                                                               ensemble_size=8))
        slice_result = engine2d.segment(volume_path, click)
        assert ensembled.uncertainty is not None and np.isfinite(ensembled.uncertainty).all()
        masks[device] = (plain.mask, slice_result.mask)
    for cpu, cuda in zip(masks["cpu"], masks["cuda"]):
        both, either = (cpu & cuda).sum(), (cpu | cuda).sum()
        assert either == 0 or both / either >= (0.99 if dtype == torch.float32 else 0.9)
