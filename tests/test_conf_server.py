"""--conf through real servers: the dtype setting reaches the models, and a conf the app cannot run
with stops the start-up with a message, instead of a server that answers 500 to every click."""

import pytest
import SimpleITK as sitk
import torch

from conftest import APP_DIR, start_server
from test_click3d_server import PHANTOM_CLICK, parse_multipart, slicer_infer  # noqa: F401
from test_click3d_server import click_studies  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def masks_by_dtype(click_studies, checkpoints, slice_checkpoints, tmp_path_factory):  # noqa: F811
    """The same Slicer clicks on float32 and bfloat16 servers: FastSAM3D and SAM-Med2D masks. Each
    server is stopped once it has answered (two models each: the suite's memory stays bounded)."""
    masks = {}
    for dtype in ("float32", "bfloat16"):
        conf = {"models": "fastsam3d,sam_med2d", "fastsam3d_checkpoint": checkpoints["fastsam3d"],
                "sam_med2d_checkpoint": slice_checkpoints["sam_med2d"], "dtype": dtype}
        folder = tmp_path_factory.mktemp(dtype)
        server = start_server(APP_DIR, click_studies, conf, folder)
        try:
            masks.update(click_both(server, folder, dtype))
        finally:
            server.stop()
    return masks


def click_both(server, folder, dtype) -> dict:
    """A FastSAM3D and a SAM-Med2D click, Slicer-shaped: (dtype, model) -> the mask."""
    masks = {}
    for model, extra in (("fastsam3d", {}), ("sam_med2d", {"slice": PHANTOM_CLICK[2]})):
        response = slicer_infer(server.url, model, "phantom_ras", [PHANTOM_CLICK], client_id=f"dtype-{dtype}", **extra)
        assert response.status_code == 200, response.text
        (folder / model).mkdir()
        _, path = parse_multipart(response, folder / model)
        masks[dtype, model] = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(bool)
    assert f"torch.{dtype}" in server.log()  # the start-up line names the precision the models run in
    return masks


@pytest.mark.parametrize("model", ["fastsam3d", "sam_med2d"])
def test_bfloat16_server_serves_and_agrees_with_float32(masks_by_dtype, model):
    reference, reduced = masks_by_dtype["float32", model], masks_by_dtype["bfloat16", model]
    assert reference.any()
    dice = 2 * (reference & reduced).sum() / (reference.sum() + reduced.sum())
    assert dice >= 0.9, dice  # seeded random weights; bench/bench_dtype.py measures the real-size agreement


@pytest.mark.parametrize("conf,message", [
    ({"device": "cuda"}, "no CUDA device"),
    ({"device": "tpu"}, "device must be cpu or cuda"),
    ({"dtype": "float8"}, "dtype must be one of"),
    ({"ensemble_dtype": "half"}, "ensemble_dtype must be one of"),
    ({"medsam_dtype": "int8"}, "medsam_dtype must be one of"),
    ({"image_cache_mb": "lots"}, "image_cache_mb must be a number"),
    ({"propagation_seconds": "-1"}, "propagation_seconds must be a number"),
    ({"modles": "fastsam3d"}, "unknown key 'modles'"),
    ({"models": "fastsam4d"}, "unknown model 'fastsam4d'"),
])
def test_a_conf_the_app_cannot_run_with_stops_the_start_with_a_message(tmp_path, sample_studies_dir, conf, message):
    if conf.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError) as stopped:
        start_server(APP_DIR, sample_studies_dir, conf, tmp_path, timeout_s=120)
    assert "exited" in str(stopped.value) and message in str(stopped.value)
