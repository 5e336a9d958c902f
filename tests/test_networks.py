"""Our networks are the official architectures: full-size key/shape manifests generated from
the official code, and small-configuration outputs of the official code (tests/data/README.md)."""

import json
from pathlib import Path

import pytest
import torch

from samlabel.modeling import build_fastsam3d, build_medsam, build_sam_med2d, build_sam_med3d_turbo
from samlabel.predictor import SamPredictor3D
from samlabel.seeded import seeded_state_dict, seeded_volume

DATA = Path(__file__).parent / "data"
BUILDERS = {"sam_med3d_turbo": build_sam_med3d_turbo, "fastsam3d": build_fastsam3d,
            "sam_vit_b": build_medsam, "sam_med2d_b": build_sam_med2d}  # sam_vit_b: the MedSAM layout
TOLERANCE = 1e-4


@pytest.mark.parametrize("name", BUILDERS)
def test_full_size_model_matches_official_manifest(name):
    manifest = json.loads((DATA / "manifests" / f"{name}.json").read_text())
    with torch.device("meta"):
        model = BUILDERS[name]()
    ours = [[key, list(t.shape)] for key, t in model.state_dict().items()]
    assert ours == [[key, shape] for key, shape, *_ in manifest["keys"]]
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == manifest["total_parameters"]


def load_reference(name):
    return torch.load(DATA / "reference" / f"{name}_small.pt", weights_only=True)


def small_model(reference, **options):
    config = reference["config"]
    encoder = config["image_encoder"]
    builder = build_sam_med3d_turbo if reference["model"].startswith("sam_med3d") else build_fastsam3d
    overrides = dict(embed_dim=encoder["embed_dim"], depth=encoder["depth"], num_heads=encoder["num_heads"],
                     prompt_dim=encoder["out_chans"], **options)
    if builder is build_sam_med3d_turbo:
        overrides["global_attn_indexes"] = tuple(encoder["global_attn_indexes"])
    model = builder(**overrides)
    shapes = {key: shape for key, shape in reference["state_dict_shapes"]}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == shapes
    model.load_state_dict(seeded_state_dict(shapes, reference["weights_seed"]))
    return model


@pytest.fixture(scope="module", params=["sam_med3d", "fastsam3d"])
def reference(request):
    return load_reference(request.param)


@pytest.fixture(params=["sdpa", "math"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SAMLABEL_ATTENTION", request.param)
    return request.param


def assert_close(ours, official, what):
    error = (ours - official).abs().max().item()
    assert error <= TOLERANCE, f"{what}: max abs error {error:.2e} > {TOLERANCE}"


def test_small_config_matches_official_outputs(reference, backend):
    model = small_model(reference)
    predictor = SamPredictor3D(model)
    embedding = predictor.set_volume(seeded_volume(reference["volume_seed"]))
    assert_close(embedding, reference["image_embedding"], "image embedding")
    assert_close(model.prompt_encoder.get_dense_pe(), reference["dense_pe"], "dense PE")
    for case in reference["cases"]:
        sparse, _ = model.prompt_encoder((case["points"], case["labels"]), case["mask_input"])
        assert_close(sparse, case["sparse_embeddings"], f"{case['name']} sparse embeddings")
        for multimask, suffix in ((False, ""), (True, "_multimask")):
            logits, iou = predictor.predict_torch(case["points"][0], case["labels"][0], case["mask_input"], multimask)
            assert_close(logits, case["low_res_logits" + suffix], f"{case['name']} low-res logits{suffix}")
            assert_close(iou, case["iou_predictions" + suffix], f"{case['name']} IoU{suffix}")


def test_reference_outputs_depend_on_every_quirk(reference):
    """The parity test can fail: breaking a quirk moves the embedding far beyond the tolerance."""
    model = small_model(reference)
    volume = seeded_volume(reference["volume_seed"])
    for module in model.image_encoder.modules():
        if hasattr(module, "rel_pos_d"):
            module.rel_pos_d.data = module.rel_pos_d.data.flip(0)
    with torch.inference_mode():
        embedding = model.image_encoder(volume)
    assert (embedding - reference["image_embedding"]).abs().max() > 100 * TOLERANCE


def test_predictor_encodes_once_and_batches_prompt_sets(reference):
    model = small_model(reference)
    calls = []
    model.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    predictor = SamPredictor3D(model)
    predictor.set_volume(seeded_volume(reference["volume_seed"]))
    cases = [c for c in reference["cases"] if c["points"].shape[1] == 3]
    singles = [predictor.predict_torch(c["points"][0], c["labels"][0], c["mask_input"])[0] for c in cases]
    points = torch.cat([c["points"] for c in cases] * 2)
    labels = torch.cat([c["labels"] for c in cases] * 2)
    batched, iou = predictor.predict_torch(points, labels)
    assert len(calls) == 1
    assert batched.shape == (len(points), 1, 32, 32, 32) and iou.shape == (len(points), 1)
    no_mask = [c for c in reference["cases"] if c["mask_input"] is None]
    for case in no_mask:
        alone, _ = predictor.predict(case["points"][0].numpy(), case["labels"][0].numpy())  # the host-array API
        assert_close(torch.from_numpy(alone), case["low_res_logits"], "no-mask case")
    assert singles  # the reference has three-click cases


def test_predictor_rejects_wrong_input(reference):
    predictor = SamPredictor3D(small_model(reference))
    with pytest.raises(RuntimeError, match="set_volume"):
        predictor.predict([[1, 2, 3]], [1])
    with pytest.raises(ValueError, match="128"):
        predictor.set_volume(torch.zeros(64, 64, 64))
    predictor.set_volume(torch.zeros(128, 128, 128))
    with pytest.raises(ValueError, match="points"):
        predictor.predict([[1, 2]], [1])


def test_sparse_attention_option_changes_global_blocks_only():
    """The paper's sparse attention is an encoder option; with w = all tokens and r = 1 it is dense."""
    reference = load_reference("fastsam3d")
    dense = small_model(reference)
    same = small_model(reference, sparse_attention=(512, 1))
    sparse = small_model(reference, sparse_attention=(64, 4))
    volume = seeded_volume(reference["volume_seed"])
    with torch.inference_mode():
        expected = dense.image_encoder(volume)
        assert_close(same.image_encoder(volume), expected, "sparse (512, 1)")
        assert (sparse.image_encoder(volume) - expected).abs().max() > 1e-2
