"""Official checkpoint files: safe loading, round trips, clear errors, the check command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samlabel.checkpoint import CheckpointError, find_checkpoint, load_model, read_checkpoint, sha256
from samlabel.registry import get_spec, registered
from samlabel.seeded import seeded_state_dict, training_checkpoint

DATA = Path(__file__).parent / "data"
MANIFEST = {"fastsam3d": "fastsam3d", "sam_med3d": "sam_med3d_turbo", "medsam": "sam_vit_b"}


def manifest_state_dict(name, seed=0):
    keys = json.loads((DATA / "manifests" / f"{MANIFEST[name]}.json").read_text())["keys"]
    return seeded_state_dict({key: shape for key, shape, *_ in keys}, seed)


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """Seeded full-size files in the official formats: FastSAM3D as saved by its training
    script (with the pickled argparse.Namespace), SAM-Med3D-turbo as a training checkpoint and
    as weights only, MedSAM as a bare SAM state dict."""
    folder = tmp_path_factory.mktemp("checkpoints")
    files = {}
    for name, layout in (("fastsam3d", "training"), ("sam_med3d", "training"), ("sam_med3d", "weights")):
        state = manifest_state_dict(name)
        path = folder / f"{layout}-{get_spec(name).checkpoint_file}"
        torch.save(training_checkpoint(state) if layout == "training" else {"model_state_dict": state}, path)
        files[name, layout] = path, state
    files["medsam", "bare"] = folder / "medsam_vit_b.pth", manifest_state_dict("medsam")
    torch.save(files["medsam", "bare"][1], files["medsam", "bare"][0])
    return files


@pytest.mark.parametrize("name,layout", [("fastsam3d", "training"), ("sam_med3d", "training"), ("sam_med3d", "weights")])
def test_official_format_round_trip(official_files, name, layout):
    path, state = official_files[name, layout]
    model = load_model(get_spec(name), path)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    assert not model.training


def test_fastsam3d_file_keeps_its_training_arguments(official_files):
    checkpoint = read_checkpoint(official_files["fastsam3d", "training"][0])
    assert checkpoint["args"].model_type == "vit_b_ori"
    assert checkpoint["lr_scheduler_state_dict"]["milestones"][120] == 1


def test_wrong_model_file_names_first_mismatches(official_files):
    medsam = official_files["medsam", "bare"][0]
    with pytest.raises(CheckpointError) as error:
        load_model(get_spec("fastsam3d"), medsam)
    message = str(error.value)
    assert str(medsam) in message and "not a FastSAM3D checkpoint" in message
    assert "image_encoder.pos_embed: file [1, 64, 64, 768] vs model [1, 8, 8, 8, 768]" in message
    assert "missing keys (first: image_encoder.blocks.2.attn.rel_pos_d" in message
    assert "unexpected keys (first: image_encoder.blocks.0.attn.proj.bias" in message
    with pytest.raises(CheckpointError, match="not a SAM-Med3D-turbo checkpoint: .*missing keys"):
        load_model(get_spec("sam_med3d"), official_files["fastsam3d", "training"][0])


def test_unreadable_files_give_clear_errors(tmp_path, official_files):
    spec = get_spec("fastsam3d")
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(spec, tmp_path / "FastSAM3D.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(official_files["fastsam3d", "training"][0].read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(spec, truncated)
    text = tmp_path / "FastSAM3D.html"
    text.write_text("<html>quota exceeded</html>")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(spec, text)


def test_arbitrary_objects_are_never_unpickled(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {}, "payload": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle: it contains .*pathlib"):
        read_checkpoint(path)
    assert not marker.exists()


class Payload:
    """Unpickling this would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_checkpoint_lookup_official_name_or_conf(tmp_path):
    spec = get_spec("sam_med3d")
    assert find_checkpoint(spec, tmp_path) == tmp_path / "sam_med3d_turbo.pth"
    assert find_checkpoint(spec, tmp_path, {"sam_med3d_checkpoint": "/data/turbo.pth"}) == Path("/data/turbo.pth")
    assert [s.checkpoint_file for s in registered().values()] == ["FastSAM3D.pth", "sam_med3d_turbo.pth", "medsam_vit_b.pth",
                                                            "medsam_point_prompt_flare22.pth", "sam-med2d_b.pth"]


def check_command(*args):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "lib")}
    return subprocess.run([sys.executable, "-m", "samlabel.cli", *map(str, args)], capture_output=True, text=True, env=env)


def test_check_command_identifies_official_files(official_files):
    for name, layout in (("fastsam3d", "training"), ("sam_med3d", "weights")):
        path = official_files[name, layout][0]
        result = check_command(path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"({name}): every key and shape matches" in result.stdout
        assert f"sha256: {sha256(path)}" in result.stdout
        assert "loads:  yes" in result.stdout
    assert "args (Namespace)" in check_command(official_files["fastsam3d", "training"][0]).stdout


def test_check_command_rejects_wrong_model(official_files, tmp_path):
    result = check_command(official_files["medsam", "bare"][0], "--model", "fastsam3d")
    assert result.returncode == 1
    assert "model:  not FastSAM3D" in result.stdout and "shape mismatches" in result.stdout
    result = check_command(official_files["medsam", "bare"][0])  # any model: it is MedSAM's layout
    assert result.returncode == 0 and "(medsam): every key and shape matches" in result.stdout
    unknown = tmp_path / "unknown.pth"
    torch.save({"encoder.layer.0.weight": torch.zeros(3, 3)}, unknown)
    result = check_command(unknown)
    assert result.returncode == 1 and "none of fastsam3d, sam_med3d, medsam, medsam_point, sam_med2d" in result.stdout
    result = check_command(official_files["fastsam3d", "training"][0], "--model", "sam_med3d")
    assert result.returncode == 1 and "not SAM-Med3D-turbo" in result.stdout
