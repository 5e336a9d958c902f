"""Official checkpoint files: safe loading, round trips, clear errors, the check command."""

import json
import os
import pickle
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from samlabel.checkpoint import CheckpointError, find_checkpoint, load_model, read_checkpoint, sha256
from samlabel.registry import get_spec, registered
from samlabel.modeling.sam3d_decoder import Sam3DDecoder
from samlabel.seeded import save_in_official_layout, save_sam3d_decoder_files, seeded_state_dict, training_checkpoint

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


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="FastSAM3D.pth: no such file"):
        load_model(get_spec("fastsam3d"), tmp_path / "FastSAM3D.pth")


class Shell:
    """Pickles as a call of os.system: what a malicious checkpoint holds. Its command only creates
    a marker file, so a test sees it if it ever runs."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


SYSTEM = f"{os.system.__module__}.system"  # as pickled: posix.system on Linux
BAD_CASES = ["empty", "random bytes", "text", "truncated zip", "pickle protocol 2", "legacy torch.save"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, official_files):
    """{case: (path, what the error must say)}: files people end up with instead of a checkpoint."""
    folder = tmp_path_factory.mktemp("bad-checkpoints")
    marker = folder / "executed"
    evil = {"model_state_dict": {"w": torch.zeros(2)}, "payload": Shell(f"touch {marker}")}
    refused = f"refused to unpickle: it contains {SYSTEM}, which is not weights data"
    unreadable = "not a readable PyTorch checkpoint"
    paths = {case: folder / f"{case.replace(' ', '-')}.pth" for case in BAD_CASES}
    paths["empty"].write_bytes(b"")
    paths["random bytes"].write_bytes(random.Random(0).randbytes(4096))
    paths["text"].write_text("<html>quota exceeded</html>\n")
    paths["truncated zip"].write_bytes(official_files["fastsam3d", "training"][0].read_bytes()[:100_000])
    paths["pickle protocol 2"].write_bytes(pickle.dumps({"payload": evil["payload"]}, protocol=2))  # no torch in it
    torch.save(evil, paths["legacy torch.save"], _use_new_zipfile_serialization=False)  # the pre-1.6 format
    expected = {"empty": "empty file (0 bytes)", "random bytes": unreadable, "text": unreadable, "truncated zip": unreadable,
                "pickle protocol 2": refused, "legacy torch.save": refused}
    return {case: (paths[case], expected[case]) for case in BAD_CASES}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_file_gives_one_clear_line(bad_files, case):
    path, expected = bad_files[case]
    with pytest.raises(CheckpointError) as error:
        load_model(get_spec("fastsam3d"), path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    assert "\n" not in message and "weights_only" not in message, message  # never torch's advice to turn the check off
    if "refused" in expected:  # said plainly: refused, not taken for a damaged file
        assert "corrupt" not in message, message
    assert not (path.parent / "executed").exists(), "a malicious checkpoint ran its code"


@pytest.mark.parametrize("case", BAD_CASES)
def test_check_command_on_bad_file_says_why_without_traceback(bad_files, case):
    path, expected = bad_files[case]
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    result = check_command(path, entry_point=True)
    assert result.returncode == 1
    assert f"error:  {error.value}\n" in result.stdout and expected in result.stdout, result.stdout
    assert result.stderr == "" and "weights_only" not in result.stdout, result.stderr


def test_refusal_names_only_the_disallowed_globals(tmp_path):
    """Next to the allowed training state (argparse.Namespace, numpy scalars, Counter), only the
    call that would run code is named."""
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({**training_checkpoint({"w": torch.zeros(2)}), "payload": Shell(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert str(error.value) == (f"{path}: refused to unpickle: it contains {SYSTEM}, which is not weights data "
                                "(unpickling it could run code); the file was not loaded")
    assert not marker.exists()


def test_concurrent_loads_of_a_training_checkpoint(tmp_path):
    """As the app's preload threads do at start-up: every load sees the allow-list, none strips it
    for the others (a scoped allow-list once refused SAM-Med3D-turbo in 6 of 6 starts)."""
    path = tmp_path / "sam_med3d_turbo.pth"
    save_in_official_layout(get_spec("sam_med3d"), {"w": torch.arange(4.0)}, path)
    threads, loads = 16, 25
    barrier = threading.Barrier(threads)
    loaded, errors = [], []

    def load():
        barrier.wait()
        for _ in range(loads):
            try:
                checkpoint = read_checkpoint(path)
                loaded.append((checkpoint["args"].model_type, checkpoint["lr_scheduler_state_dict"]["milestones"][120]))
            except CheckpointError as error:
                errors.append(str(error))

    workers = [threading.Thread(target=load) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == [] and loaded == [("vit_b_ori", 1)] * (threads * loads), errors[:1]


def test_checkpoint_lookup_official_name_or_conf(tmp_path):
    spec = get_spec("sam_med3d")
    assert find_checkpoint(spec, tmp_path) == tmp_path / "sam_med3d_turbo.pth"
    assert find_checkpoint(spec, tmp_path, {"sam_med3d_checkpoint": "/data/turbo.pth"}) == Path("/data/turbo.pth")
    assert [s.checkpoint_file for s in registered().values()] == [
        "FastSAM3D.pth", "sam_med3d_turbo.pth", "medsam_vit_b.pth", "medsam_point_prompt_flare22.pth", "sam-med2d_b.pth",
        "sam3d_synapse/model_final_checkpoint.model", "sam3d_acdc/model_final_checkpoint.model",
        "sam3d_lung/model_final_checkpoint.model", "sam3d_brats/model_final_checkpoint.model"]


def check_command(*args, entry_point=False):
    """samlabel-check-checkpoint as `python -m samlabel.cli`, or as the installed command."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "lib")}
    command = [str(Path(sys.executable).with_name("samlabel-check-checkpoint"))] if entry_point else \
        [sys.executable, "-m", "samlabel.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env)


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
    assert "sam3d:  its image_encoder is SAM ViT-B, the layout of Meta's sam_vit_b_01ec64.pth" in result.stdout
    unknown = tmp_path / "unknown.pth"
    torch.save({"encoder.layer.0.weight": torch.zeros(3, 3)}, unknown)
    result = check_command(unknown)
    assert result.returncode == 1 and "none of fastsam3d, sam_med3d, medsam, medsam_point, sam_med2d" in result.stdout
    result = check_command(official_files["fastsam3d", "training"][0], "--model", "sam_med3d")
    assert result.returncode == 1 and "not SAM-Med3D-turbo" in result.stdout


@pytest.fixture(scope="module")
def sam3d_model(tmp_path_factory):
    """SAM3D's decoder as its trainer saves it (Synapse: 1 modality, 14 classes), the .model.pkl next to it."""
    path = tmp_path_factory.mktemp("sam3d") / "model_final_checkpoint.model"
    save_sam3d_decoder_files(path, seeded_state_dict({k: v.shape for k, v in Sam3DDecoder(14).state_dict().items()}, 0))
    return path


def test_check_command_identifies_sam3d_files(sam3d_model, tmp_path):
    result = check_command(sam3d_model)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("model:  SAM3D decoder (nnU-Net training checkpoint, epoch 1000) for 1 modality and 14 classes, "
            "1,880,258 values") in result.stdout
    assert f"plans:  {sam3d_model}.pkl: patch [64, 176, 176] (SAM encoder at 176x176)" in result.stdout
    assert "loads:  yes, with its plans" in result.stdout
    result = check_command(f"{sam3d_model}.pkl")
    assert result.returncode == 0 and "model:  SAM3D plans (nnU-Net .model.pkl): patch [64, 176, 176]" in result.stdout
    alone = tmp_path / "model_best.model"
    alone.write_bytes(sam3d_model.read_bytes())
    result = check_command(alone)
    assert result.returncode == 1 and f"error:  {alone}.pkl: no such file: a SAM3D .model is unusable" in result.stdout


def test_check_command_refuses_unsafe_plans(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "model_best.model.pkl"
    path.write_bytes(pickle.dumps({"init": (), "plans": {"payload": Shell(f"touch {marker}")}}))
    result = check_command(path, entry_point=True)
    assert result.returncode == 1 and result.stderr == "", result.stderr
    assert f"error:  {path}: refused to unpickle: it contains {SYSTEM}, which is not plans data" in result.stdout
    assert not marker.exists()
