"""The 2D networks (MedSAM = SAM ViT-B, SAM-Med2D = SAM ViT-B at 256 with adapters) give the official
architectures' small-configuration outputs (tests/data/README.md); their manifests are in test_networks.py."""

from pathlib import Path

import pytest
import torch

from samlabel.modeling import build_medsam, build_sam_med2d
from samlabel.seeded import seeded_image, seeded_state_dict

DATA = Path(__file__).parent / "data"
REFERENCES = {"medsam": build_medsam, "sam_med2d": build_sam_med2d}
TOLERANCE = 1e-4


def small_model(reference):
    encoder, decoder = reference["config"]["image_encoder"], reference["config"]["transformer"]
    model = REFERENCES[reference["model"].removesuffix("_small")](
        img_size=encoder["img_size"], embed_dim=encoder["embed_dim"], depth=encoder["depth"], num_heads=encoder["num_heads"],
        window_size=encoder["window_size"], global_attn_indexes=tuple(encoder["global_attn_indexes"]),
        prompt_dim=encoder["out_chans"], decoder_mlp_dim=decoder["mlp_dim"],
        iou_head_hidden_dim=reference["config"]["mask_decoder"]["iou_head_hidden_dim"])
    shapes = {key: shape for key, shape in reference["state_dict_shapes"]}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == shapes
    model.load_state_dict(seeded_state_dict(shapes, reference["weights_seed"]))
    return model


@pytest.fixture(scope="module", params=list(REFERENCES))
def reference(request):
    return torch.load(DATA / "reference" / f"{request.param}_small.pt", weights_only=True)


@pytest.fixture(params=["sdpa", "math"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SAMLABEL_ATTENTION", request.param)


def assert_close(ours, official, what):
    error = (ours - official).abs().max().item()
    assert error <= TOLERANCE, f"{what}: max abs error {error:.2e} > {TOLERANCE}"


def test_small_config_matches_official_outputs(reference, backend):
    model = small_model(reference)
    image = seeded_image(reference["image_seed"])
    with torch.inference_mode():
        embedding = model.image_encoder(image)
        assert_close(embedding, reference["image_embedding"], "image embedding")
        assert_close(model.prompt_encoder.get_dense_pe(), reference["dense_pe"], "dense PE")
        for case in reference["cases"]:
            points = (case["points"], case["labels"]) if case["points"] is not None else None
            sparse, dense = model.prompt_encoder(points, case["boxes"], case["mask_input"])
            assert_close(sparse, case["sparse_embeddings"], f"{case['name']} sparse")
            assert_close(dense, case["dense_embeddings"], f"{case['name']} dense")
            for multimask, suffix in ((False, ""), (True, "_multimask")):
                logits, iou = model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
                assert_close(logits, case["low_res_logits" + suffix], f"{case['name']} logits{suffix}")
                assert_close(iou, case["iou_predictions" + suffix], f"{case['name']} IoU{suffix}")


def test_reference_outputs_depend_on_adapters_and_rel_pos(reference):
    """The parity test can fail: a flipped rel-pos table or a silenced adapter moves the embedding."""
    image = seeded_image(reference["image_seed"])
    breaks = {"rel-pos": lambda block: block.attn.rel_pos_h.data.copy_(block.attn.rel_pos_h.data.flip(0))}
    if reference["model"].startswith("sam_med2d"):
        breaks["adapter"] = lambda block: block.Adapter.norm.weight.data.zero_()
    for name, break_block in breaks.items():
        model = small_model(reference)
        break_block(model.image_encoder.blocks[0])
        with torch.inference_mode():
            assert (model.image_encoder(image) - reference["image_embedding"]).abs().max() > 100 * TOLERANCE, name
