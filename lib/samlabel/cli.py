"""samlabel-check-checkpoint: which model a downloaded file is, whether it loads, its sha256.

Besides the registered models' files it knows SAM3D's: the decoder's .model (checked with the
.model.pkl plans next to it), the .model.pkl alone, and Meta's SAM ViT-B (its slice encoder)."""

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import CheckpointError, check_state_dict, load_model, read_checkpoint, sha256, state_dict_of
from .modeling.image_encoder import ImageEncoderViT
from .modeling.sam3d_decoder import Sam3DDecoder
from .registry import get_spec, registered
from .sam3d_checkpoint import (check_decoder, decoder_size, decoder_state, is_sam3d_model, network_arguments, plans_path_of,
                               read_plans, sam_encoder_state, stage_plans)

SAM_NATIVE_SIZE = 1024  # Meta's SAM input size: a 64x64 pos_embed
SAM3D_FAMILY = "auto3d"  # registry entries served from SAM3D's three files


def _layout(checkpoint) -> str:
    if not isinstance(checkpoint, Mapping):
        return type(checkpoint).__name__
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return f"a bare state dict ({len(checkpoint)} tensors)"
    entries = [f"{k} ({type(v).__name__})" for k, v in checkpoint.items()]
    return "a dict with " + ", ".join(entries)


def check_checkpoint(path, model_name=None, out=sys.stdout) -> bool:
    """Print what the file is; True when it loads into `model_name` (or into some known model)."""
    print(f"file:   {path}", file=out)
    if model_name is None and Path(path).name.endswith(".pkl"):  # a plain pickle, not a torch file
        return _check_sam3d_plans(path, out)
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as error:
        print(f"error:  {error}", file=out)
        return False
    print(f"sha256: {sha256(path)}", file=out)
    print(f"layout: {_layout(checkpoint)}", file=out)
    sam3d_asked = model_name is not None and get_spec(model_name).family == SAM3D_FAMILY
    if (model_name is None or sam3d_asked) and is_sam3d_model(checkpoint):
        return _check_sam3d_model(path, checkpoint, out)
    if sam3d_asked:
        print(f"model:  not {get_spec(model_name).title}: no SAM3D decoder state dict (an nnU-Net v1 .model)", file=out)
        return False
    loaded = _check_registered(path, checkpoint, model_name, out)
    if loaded and model_name is None:
        _report_sam3d_encoder(path, checkpoint, out)
    return loaded


def _check_registered(path, checkpoint, model_name, out) -> bool:
    # SAM3D's entries are recognised above: their network's shape comes from the plans next to the file
    candidates = [get_spec(model_name)] if model_name else [s for s in registered().values() if s.family != SAM3D_FAMILY]
    errors = []
    for spec in candidates:
        try:
            state = state_dict_of(checkpoint, spec, path)
            check_state_dict(state, spec, path)
            model = load_model(spec, path)  # its errors too are messages, never a traceback
        except CheckpointError as error:
            errors.append(str(error))
            continue
        values = sum(t.numel() for t in model.state_dict().values())
        finite = all(torch.isfinite(t).all() for t in model.state_dict().values())
        print(f"model:  {spec.title} ({spec.name}): every key and shape matches, {values:,} values", file=out)
        print(f"loads:  yes{'' if finite else ' (WARNING: contains NaN or infinite values)'}", file=out)
        print(f"put it at apps/fastsam3d/model/{spec.checkpoint_file} or pass --conf {spec.name}_checkpoint <path>", file=out)
        return finite
    print("model:  " + ("not " + candidates[0].title if model_name else "none of " + ", ".join(s.name for s in candidates)),
          file=out)
    for error in errors:
        print(f"error:  {error}", file=out)
    return False


def _describe_plans(plans: dict, path) -> str:
    arguments = network_arguments(plans, path)
    stage = stage_plans(plans)
    size = arguments["img_size"]
    spacing = [round(float(s), 4) for s in stage["current_spacing"]]
    return (f"patch {[int(n) for n in stage['patch_size']]} (SAM encoder at {size}x{size}), target spacing {spacing} mm, "
            f"normalization {plans['normalization_schemes']}, {_modalities(plans['num_modalities'])}, "
            f"{plans['num_classes']} classes + background")


def _modalities(count: int) -> str:
    return f"{count} modalit{'y' if count == 1 else 'ies'}"


def _check_sam3d_plans(path, out) -> bool:
    try:
        plans = read_plans(path)
        description = _describe_plans(plans, path)
    except CheckpointError as error:
        print(f"error:  {error}", file=out)
        return False
    print(f"sha256: {sha256(path)}", file=out)
    print(f"model:  SAM3D plans (nnU-Net .model.pkl): {description}", file=out)
    print(f"use it with the .model it belongs to, {str(path).removesuffix('.pkl')}", file=out)
    return True


def _check_sam3d_model(path, checkpoint, out) -> bool:
    """A SAM3D .model: the decoder's keys and shapes against the plans saved next to it."""
    plans_path = plans_path_of(path)
    try:
        state = decoder_state(checkpoint, path)
        modalities, classes = decoder_size(state)
        print(f"model:  SAM3D decoder (nnU-Net training checkpoint, epoch {checkpoint.get('epoch')}) for "
              f"{_modalities(modalities)} and {classes} classes, {sum(t.numel() for t in state.values()):,} values", file=out)
        if not plans_path.is_file():
            raise CheckpointError(f"{plans_path}: no such file: a SAM3D .model is unusable without the plans pickle "
                                  "that was saved next to it")
        plans = read_plans(plans_path)
        arguments = network_arguments(plans, plans_path)
        with torch.device("meta"):
            check_decoder(state, Sam3DDecoder(arguments["num_classes"], arguments["num_modalities"]), path)
        print(f"plans:  {plans_path}: {_describe_plans(plans, plans_path)}", file=out)
    except CheckpointError as error:
        print(f"error:  {error}", file=out)
        return False
    finite = all(torch.isfinite(t).all() for t in state.values())
    print(f"loads:  yes, with its plans{'' if finite else ' (WARNING: contains NaN or infinite values)'}", file=out)
    print("use it with Meta's sam_vit_b_01ec64.pth (SAM3D's frozen slice encoder) and the .model.pkl next to it", file=out)
    return finite


def _report_sam3d_encoder(path, checkpoint, out) -> None:
    """One line when the file's image encoder is SAM ViT-B, which SAM3D encodes slices with."""
    with torch.device("meta"):
        encoder = ImageEncoderViT(img_size=SAM_NATIVE_SIZE)
    try:
        sam_encoder_state(checkpoint, encoder, path)
    except CheckpointError:
        return
    print("sam3d:  its image_encoder is SAM ViT-B, the layout of Meta's sam_vit_b_01ec64.pth that SAM3D encodes slices "
          "with (resized to the patch size when loaded)", file=out)


def check_checkpoint_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="samlabel-check-checkpoint", description=__doc__)
    parser.add_argument("path", help="checkpoint file, e.g. FastSAM3D.pth, sam_med3d_turbo.pth or SAM3D's model_best.model")
    parser.add_argument("--model", choices=sorted(registered()), help="the model the file should be (default: any)")
    args = parser.parse_args(argv)
    return 0 if check_checkpoint(args.path, args.model) else 1


if __name__ == "__main__":
    sys.exit(check_checkpoint_main())
