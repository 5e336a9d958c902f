"""Reference outputs of the official SAM3D network, for tests/test_sam3d_network.py.

    python -m pip install --target /tmp/sam3d-extra einops==0.6.0
    PYTHONPATH=/tmp/sam3d-extra .venv/bin/python scripts/make_reference_sam3d.py --official /path/to/SAM3D \
        [--out tests/data/reference]

Runs the OFFICIAL network (sam3d/network_architecture/sam3d.py, class Sam3D, of a checkout of
UARK-AICV/SAM3D given with --official; nothing of it is copied here) on seeded inputs and writes
`<out>/sam3d_small.pt` (torch.save of plain values and tensors: loads with weights_only=True).

The configuration is small so that it runs in seconds on a CPU, with the official code paths:
  - SAM encoder: the official _build_sam (segment_anything/build_sam.py) with a small ViT (embed_dim
    64, depth 4, 4 heads, global blocks 1 and 3; its window 14, patch 16 and 256 output channels are
    fixed there), registered at run time as sam_model_registry["vit_small"], so that Sam3D.forward
    builds it from a checkpoint as it does ViT-B. The checkpoint is seeded (samlabel.seeded.
    seeded_sam_state_dict, Meta's layout at 1024^2: a 64x64 pos_embed), so the official load_from
    resizes pos_embed and the global blocks' rel-pos tables to the 64x64-pixel slices (4x4 tokens).
  - Decoder: Sam3D as the trainers build it (do_ds=True), weights seeded from its own state_dict
    shapes, two cases: one modality and 14 classes (Synapse's) with deep supervision, and four
    modalities and 4 classes (BraTS's) without, batch 2. Two slices each.
Sam3D.forward moves its SAM to the GPU with .cuda(); this script replaces torch.nn.Module.cuda with
a no-op in its own process (the official files are not edited).

Stored: `source`, `config` (the small ViT), `sam_seed`; `encoder_loaded` (pos_embed and every
rel_pos table of the SAM encoder as the official loader left them); per case in `cases`: `name`,
`num_classes`, `num_modalities`, `decoder_seed`, `state_dict_shapes` ([[key, shape], ...] in
state_dict order), `input` (B, M, D, 64, 64), `features` (the input of decoder5: (B, 256*M, D, 4, 4)),
`logits` (B, C, D, 64, 64) and, with deep supervision, `deep_supervision` ([out2, out3]).

Besides torch and numpy, the official package imports modules that this network does not use
(icecream, safetensors, batchgenerators, torchvision); where one does not import, a stand-in
whose names raise if called is put on the path. einops it does use: install it (above).
Everything runs in float32 on the CPU, one thread; reruns write the same values.
"""

import argparse
import importlib
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_source.py, beside this file
from reference_source import commit_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL_VIT = {"embed_dim": 64, "depth": 4, "num_heads": 4, "global_attn_indexes": (1, 3)}
SLICE_SIZE, SLICES = 64, 2
SAM_SEED = 3101
# (name, num_classes, num_modalities, batch, deep supervision, decoder seed, input seed)
CASES = (("one_modality_14_classes", 14, 1, 1, True, 3102, 3103),
         ("four_modalities_4_classes", 4, 4, 2, False, 3104, 3105))

# Modules the official package imports for names this network never calls: {module: names}.
UNUSED_IMPORTS = {
    "icecream": ["ic"],
    "safetensors": ["safe_open"],
    "safetensors.torch": ["save_file"],
    "batchgenerators.augmentations.utils": ["pad_nd_image"],
    "torchvision.transforms.functional": ["resize", "to_pil_image"],
    "torchvision.ops.boxes": ["batched_nms", "box_area"],
}
STAND_IN = '''"""Stand-in written by scripts/make_reference_sam3d.py: imported by the official package, never called."""


def _absent(*args, **kwargs):
    raise RuntimeError("{module} is not installed (stand-in of scripts/make_reference_sam3d.py)")


{assignments}
'''


def stand_ins(folder: Path) -> None:
    """Put a stand-in on sys.path for each module of UNUSED_IMPORTS that does not import."""
    for module, names in UNUSED_IMPORTS.items():
        try:
            importlib.import_module(module)
            continue
        except ImportError:
            pass
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):  # packages along the way
            package = folder.joinpath(*parts[:depth])
            package.mkdir(parents=True, exist_ok=True)
            (package / "__init__.py").touch()
        text = STAND_IN.format(module=module, assignments="\n".join(f"{name} = _absent" for name in names))
        folder.joinpath(*parts, "__init__.py").write_text(text)
    sys.path.append(str(folder))


def seeded_input(seed: int, batch: int, modalities: int) -> torch.Tensor:
    """(B, M, D, 64, 64) float32 like nnU-Net-normalised intensities: smooth blobs plus noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((batch, modalities, SLICES, 4, 4), generator=generator)
    smooth = F.interpolate(coarse, size=(SLICES, SLICE_SIZE, SLICE_SIZE), mode="trilinear", align_corners=False)
    return (smooth + 0.1 * torch.randn(smooth.shape, generator=generator)).float()


def run_official(checkout: Path, work: Path) -> dict:
    from samlabel.seeded import seeded_sam_state_dict, seeded_state_dict

    sys.path.insert(0, str(checkout))
    from sam3d.network_architecture.sam3d import Sam3D, sam_model_registry

    build_sam = importlib.import_module("sam3d.network_architecture.segment_anything.build_sam")
    small = {"encoder_embed_dim": SMALL_VIT["embed_dim"], "encoder_depth": SMALL_VIT["depth"],
             "encoder_num_heads": SMALL_VIT["num_heads"], "encoder_global_attn_indexes": list(SMALL_VIT["global_attn_indexes"])}
    sam_model_registry["vit_small"] = partial(build_sam._build_sam, **small)
    torch.nn.Module.cuda = lambda self, device=None: self  # Sam3D.forward calls sam.cuda()

    sam_path = work / "sam_small_seeded.pth"
    torch.save(seeded_sam_state_dict(SAM_SEED, **SMALL_VIT), sam_path)
    loaded = sam_model_registry["vit_small"](image_size=SLICE_SIZE, num_classes=14, checkpoint=str(sam_path), in_channel=3,
                                             pixel_mean=[0, 0, 0], pixel_std=[1, 1, 1]).image_encoder.state_dict()
    encoder_loaded = {k: v.clone() for k, v in loaded.items() if k == "pos_embed" or "rel_pos" in k}

    cases = []
    for name, num_classes, modalities, batch, deep, decoder_seed, input_seed in CASES:
        network = Sam3D(num_classes=num_classes, ckpt=str(sam_path), image_size=[SLICES, SLICE_SIZE, SLICE_SIZE],
                        vit_name="vit_small", num_modalities=modalities, do_ds=True)
        shapes = [[k, list(v.shape)] for k, v in network.state_dict().items()]
        network.load_state_dict(seeded_state_dict(dict(shapes), decoder_seed), strict=True)
        network.eval()
        network.do_ds = deep
        recorded = {}
        network.decoder5.register_forward_hook(lambda module, args, out, recorded=recorded: recorded.update(
            features=args[0].clone()))
        x = seeded_input(input_seed, batch, modalities)
        with torch.no_grad():
            out = network(x)
        case = {"name": name, "num_classes": num_classes, "num_modalities": modalities, "decoder_seed": decoder_seed,
                "state_dict_shapes": shapes, "input": x, "features": recorded["features"],
                "logits": out[0] if deep else out, "deep_supervision": list(out[1:]) if deep else None}
        cases.append(case)
    return {"encoder_loaded": encoder_loaded, "cases": cases}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of UARK-AICV/SAM3D")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "reference")
    args = parser.parse_args(argv)
    checkout = args.official.resolve()
    if not (checkout / "sam3d" / "network_architecture" / "sam3d.py").is_file():
        parser.error(f"{checkout} is not a SAM3D checkout (no sam3d/network_architecture/sam3d.py)")
    try:
        import einops  # noqa: F401 - the official forward's rearrange / repeat
    except ImportError:
        parser.error("the official network needs einops: pip install --target DIR einops==0.6.0, then PYTHONPATH=DIR")
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO / "lib"))
    with tempfile.TemporaryDirectory(prefix="reference-sam3d-") as tmp:
        stand_ins(Path(tmp) / "stand-ins")
        data = run_official(checkout, Path(tmp))
    data = {
        "model": "sam3d_small",
        "source": {"repository": "UARK-AICV/SAM3D", "commit": commit_of(checkout),
                   "code": ["sam3d/network_architecture/sam3d.py (Sam3D)",
                            "sam3d/network_architecture/segment_anything/build_sam.py (_build_sam, load_from)"],
                   "generator": "scripts/make_reference_sam3d.py"},
        "config": {**SMALL_VIT, "global_attn_indexes": list(SMALL_VIT["global_attn_indexes"]), "window_size": 14,
                   "img_size": SLICE_SIZE, "slices": SLICES},
        "sam_seed": SAM_SEED,
        **data,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "sam3d_small.pt"
    torch.save(data, path)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
