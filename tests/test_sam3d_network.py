"""SAM3D: the decoder's official layout, its three official files, parity with the official network
(tests/data/reference/sam3d_small.pt, written by scripts/make_reference_sam3d.py from UARK-AICV/SAM3D)
and safe reading of the plans pickle."""

import argparse
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from samlabel.checkpoint import CheckpointError
from samlabel.modeling.sam3d_decoder import Sam3DDecoder
from samlabel.sam3d_checkpoint import load_sam3d, network_arguments, read_plans, resize_sam_encoder_state, stage_plans
from samlabel.seeded import (nnunet_plans_info, nnunet_training_checkpoint, save_sam3d_decoder_files, seeded_sam_state_dict,
                             seeded_state_dict)

REFERENCE = Path(__file__).parent / "data" / "reference" / "sam3d_small.pt"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


def small_vit(reference) -> dict:
    config = reference["config"]
    return {"embed_dim": config["embed_dim"], "depth": config["depth"], "num_heads": config["num_heads"],
            "global_attn_indexes": tuple(config["global_attn_indexes"])}


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    """Seeded files in the official formats for the reference's weights: {'sam': Meta's layout (small
    ViT at 1024^2), case name: the decoder's .model (its .model.pkl next to it), (case name, 'state'):
    the decoder weights}."""
    folder = tmp_path_factory.mktemp("sam3d")
    files = {"sam": folder / "sam_vit_small_seeded.pth"}
    torch.save(seeded_sam_state_dict(reference["sam_seed"], **small_vit(reference)), files["sam"])
    size = reference["config"]["img_size"]
    for case in reference["cases"]:
        state = seeded_state_dict(dict(case["state_dict_shapes"]), case["decoder_seed"])
        path = folder / f"{case['name']}.model"
        save_sam3d_decoder_files(path, state, case["num_modalities"], patch_size=(reference["config"]["slices"], size, size))
        files[case["name"]], files[case["name"], "state"] = path, state
    return files


@pytest.fixture(scope="module")
def models(reference, files):
    return {case["name"]: load_sam3d(files["sam"], files[case["name"]], **small_vit(reference))[0]
            for case in reference["cases"]}


def max_error(ours, official) -> float:
    return (ours - official).abs().max().item()


# ---- the official layout --------------------------------------------------------------------------

@pytest.mark.parametrize("num_modalities,num_classes,parameters", [(1, 14, 1_880_258), (4, 4, 4_632_180)])
def test_decoder_has_the_official_keys_and_parameters(reference, num_modalities, num_classes, parameters):
    decoder = Sam3DDecoder(num_classes, num_modalities)
    assert len(decoder.state_dict()) == 36
    assert sum(p.numel() for p in decoder.parameters()) == parameters
    official = next(c for c in reference["cases"] if (c["num_modalities"], c["num_classes"]) == (num_modalities, num_classes))
    assert [[k, list(v.shape)] for k, v in decoder.state_dict().items()] == official["state_dict_shapes"]


def test_official_files_load_strictly(reference, files, models):
    for case in reference["cases"]:
        model = models[case["name"]]
        loaded = model.decoder.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in files[case["name"], "state"].items())
        assert not model.training and all(t.dtype == torch.float32 for t in model.state_dict().values())
        assert not any(p.requires_grad for p in model.image_encoder.parameters())  # frozen, as trained
        assert model.image_encoder.pos_embed.shape == (1, 4, 4, reference["config"]["embed_dim"])  # resized from 64x64


# ---- parity with the official network ----------------------------------------------------------------

@pytest.fixture(params=["sdpa", "math"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SAMLABEL_ATTENTION", request.param)


def test_outputs_match_the_official_network(reference, models, backend):
    for case in reference["cases"]:
        model = models[case["name"]]
        with torch.inference_mode():
            features = model.encode(case["input"])
            assert max_error(features, case["features"]) <= TOLERANCE, case["name"]
            deep = case["deep_supervision"] is not None
            logits = model.decode(features, deep_supervision=deep)
        if deep:
            logits, *lower = logits
            assert len(lower) == 2 and all(o.shape == r.shape for o, r in zip(lower, case["deep_supervision"]))
            assert max(max_error(o, r) for o, r in zip(lower, case["deep_supervision"])) <= TOLERANCE, case["name"]
        assert logits.shape == case["logits"].shape
        assert max_error(logits, case["logits"]) <= TOLERANCE, case["name"]


def test_forward_is_encode_then_decode_in_any_slice_batches(reference, models):
    case = reference["cases"][1]  # two volumes, four modalities
    model = models[case["name"]]
    with torch.inference_mode():
        whole = model(case["input"])
        model.slices_per_batch = 3  # 16 slices in batches of 3, 3, ..., 1
        try:
            assert max_error(model(case["input"]), whole) <= 1e-5
        finally:
            model.slices_per_batch = 32
    assert max_error(whole, case["logits"]) <= TOLERANCE


def test_parity_test_can_fail(reference, models):
    """Reversed modalities or an un-resized global rel-pos table move the outputs well past the tolerance."""
    case = reference["cases"][1]
    model = models[case["name"]]
    with torch.inference_mode():
        assert max_error(model.encode(case["input"].flip(1)), case["features"]) > 100 * TOLERANCE
        table = model.image_encoder.blocks[1].attn.rel_pos_h
        saved = table.clone()
        table.copy_(table.flip(0))
        try:
            assert max_error(model.encode(case["input"]), case["features"]) > 100 * TOLERANCE
        finally:
            table.copy_(saved)


def test_resize_matches_the_official_loader(reference):
    """pos_embed 64x64 -> 4x4 and the global blocks' tables 127 -> 7 rows, bit for bit as load_from
    left them; the windowed blocks' 27-row tables as they were."""
    sam = seeded_sam_state_dict(reference["sam_seed"], **small_vit(reference))
    state = {k.removeprefix("image_encoder."): v for k, v in sam.items() if k.startswith("image_encoder.")}
    grid = reference["config"]["img_size"] // 16
    resized = resize_sam_encoder_state(state, grid, reference["config"]["global_attn_indexes"])
    for key, official in reference["encoder_loaded"].items():
        assert torch.equal(resized[key], official), key
    assert resized["blocks.1.attn.rel_pos_h"].shape[0] == 2 * grid - 1 and torch.equal(resized["blocks.0.attn.rel_pos_h"],
                                                                                       state["blocks.0.attn.rel_pos_h"])
    assert resize_sam_encoder_state(state, 64, (1, 3)) == state  # at SAM's own 1024^2: untouched


# ---- the plans pickle --------------------------------------------------------------------------------

def test_plans_are_plain_data(files, reference):
    path = Path(f"{files[reference['cases'][0]['name']]}.pkl")
    plans = read_plans(path)

    def walk(value):
        assert not isinstance(value, (OrderedDict, np.generic)), type(value)
        for item in value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ():
            walk(item)

    walk(plans)
    assert list(stage_plans(plans)["patch_size"]) == [2, 64, 64] and isinstance(stage_plans(plans)["patch_size"], np.ndarray)
    assert plans["dataset_properties"]["intensityproperties"][0]["percentile_00_5"] == -958.0
    assert plans["normalization_schemes"] == {0: "CT"} and plans["transpose_forward"] == [0, 1, 2]
    assert network_arguments(plans) == {"img_size": 64, "num_classes": 14, "num_modalities": 1}


def test_plans_pickled_under_numpy_1_read_the_same(tmp_path):
    """Files written with numpy 1.x name numpy.core.multiarray; protocol 3 spells globals as text lines."""
    info = nnunet_plans_info(4, 4)
    data = pickle.dumps(info, protocol=3).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and b"cnumpy.core.multiarray\nscalar\n" in data
    path = tmp_path / "numpy1.model.pkl"
    path.write_bytes(data)
    plans = read_plans(path)
    assert network_arguments(plans) == {"img_size": 176, "num_classes": 4, "num_modalities": 4}
    assert plans["dataset_properties"]["intensityproperties"][3]["mean"] == 82.5


class Call:
    """Pickles as a call of `function(*args)`: what a malicious pickle holds."""

    def __init__(self, function, *args):
        self.reduced = (function, args)

    def __reduce__(self):
        return self.reduced


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "a class instance"])
def test_plans_unpickler_refuses_code_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "executed"
    thing = {"os.system": Call(os.system, f"touch {marker}"),
             "builtins.eval": Call(eval, f"open({str(marker)!r}, 'w')"),
             "a class instance": argparse.Namespace(model_type="vit_b")}[payload]
    path = tmp_path / "evil.model.pkl"
    path.write_bytes(pickle.dumps({"init": (), "name": "x", "plans": {"payload": thing}}))
    with pytest.raises(CheckpointError) as error:
        read_plans(path)
    message = str(error.value)
    name = {"os.system": f"{os.system.__module__}.system", "builtins.eval": "builtins.eval",
            "a class instance": "argparse.Namespace"}[payload]
    assert message == (f"{path}: refused to unpickle: it contains {name}, which is not plans data "
                       "(unpickling it could run code); the file was not loaded")
    assert not marker.exists(), "the plans pickle ran its code"


# ---- bad files: one line each -----------------------------------------------------------------------

BAD_FILES = {  # case: (which file is bad, what the error says)
    "empty plans": ("plans", "empty file (0 bytes), not a plans pickle"),
    "truncated plans": ("plans", "not a readable plans pickle (truncated, corrupt, or not a pickle)"),
    "torch file as plans": ("plans", "not a readable plans pickle"),
    "bare nnU-Net plans": ("plans", ("not the .model.pkl saved with SAM3D weights: expected a dict with 'init', 'name' "
                                     "and 'plans', found: num_stages, num_modalities")),
    "plans without stages": ("plans", "not nnU-Net plans: missing plans_per_stage"),
    "missing plans": ("plans", "no such file"),
    "empty .model": ("model", "empty file (0 bytes), not a PyTorch checkpoint"),
    "truncated .model": ("model", "not a readable PyTorch checkpoint"),
    "SAM file as .model": ("model", ("not a SAM3D .model checkpoint: expected an entry 'state_dict' of weights, found: "
                                     "image_encoder.blocks.0.attn.proj.bias")),
    "plans of other classes": ("model", ("is not a SAM3D decoder checkpoint: 6 shape mismatches (first: "
                                         "out1.segmentation_head.weight: file [14, 8, 1, 1, 1] vs model [5, 8, 1, 1, 1]")),
    ".model as SAM file": ("sam", ("not a SAM checkpoint (the layout of Meta's sam_vit_b_01ec64.pth): no "
                                   "image_encoder.pos_embed; found: epoch, state_dict")),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_gives_one_clear_line(reference, files, tmp_path, case):
    good = files[reference["cases"][0]["name"]]
    paths = {"sam": files["sam"], "model": tmp_path / "model_best.model", "plans": tmp_path / "model_best.model.pkl"}
    paths["model"].write_bytes(good.read_bytes())
    paths["plans"].write_bytes(Path(f"{good}.pkl").read_bytes())
    bad, expected = BAD_FILES[case]
    content = {
        "empty plans": b"", "truncated plans": paths["plans"].read_bytes()[:300], "torch file as plans": good.read_bytes(),
        "bare nnU-Net plans": pickle.dumps(nnunet_plans_info(14)["plans"]),
        "plans without stages": pickle.dumps({**nnunet_plans_info(14), "plans": {"num_classes": 13}}),
        "empty .model": b"", "truncated .model": good.read_bytes()[:50_000], "SAM file as .model": files["sam"].read_bytes(),
        "plans of other classes": pickle.dumps(nnunet_plans_info(5, patch_size=(2, 64, 64))), ".model as SAM file": None,
    }.get(case)
    if case == "missing plans":
        paths["plans"].unlink()
    elif case == ".model as SAM file":
        paths["sam"] = paths["model"]
    else:
        (paths["plans"] if case == "plans of other classes" else paths[bad]).write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_sam3d(paths["sam"], paths["model"], **small_vit(reference))
    message = str(error.value)
    assert message.startswith(f"{paths[bad]}") and expected in message, message
    assert "\n" not in message and "weights_only" not in message, message


def test_data_parallel_prefix_is_stripped(reference, files, tmp_path):
    """As the official loader does for weights saved from nn.DataParallel."""
    case = reference["cases"][0]
    state = {f"module.{k}": v for k, v in files[case["name"], "state"].items()}
    path = tmp_path / "model_final_checkpoint.model"
    torch.save(nnunet_training_checkpoint(state), path)
    Path(f"{path}.pkl").write_bytes(pickle.dumps(nnunet_plans_info(case["num_classes"], patch_size=(2, 64, 64))))
    model, _ = load_sam3d(files["sam"], path, **small_vit(reference))
    assert torch.equal(model.decoder.out1.segmentation_head.weight, files[case["name"], "state"]["out1.segmentation_head.weight"])
