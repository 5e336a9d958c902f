"""samlabel-check-checkpoint: which model a downloaded file is, whether it loads, its sha256."""

import argparse
import sys
from collections.abc import Mapping

import torch

from .checkpoint import CheckpointError, check_state_dict, load_model, read_checkpoint, sha256, state_dict_of
from .registry import get_spec, registered


def _layout(checkpoint) -> str:
    if not isinstance(checkpoint, Mapping):
        return type(checkpoint).__name__
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return f"a bare state dict ({len(checkpoint)} tensors)"
    entries = [f"{k} ({type(v).__name__})" for k, v in checkpoint.items()]
    return "a dict with " + ", ".join(entries)


def check_checkpoint(path, model_name=None, out=sys.stdout) -> bool:
    """Print what the file is; True when it loads into `model_name` (or into some known model)."""
    candidates = [get_spec(model_name)] if model_name else list(registered().values())
    print(f"file:   {path}", file=out)
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as error:
        print(f"error:  {error}", file=out)
        return False
    print(f"sha256: {sha256(path)}", file=out)
    print(f"layout: {_layout(checkpoint)}", file=out)
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
    print("model:  " + ("not " + candidates[0].title if model_name else "none of " + ", ".join(registered())), file=out)
    for error in errors:
        print(f"error:  {error}", file=out)
    return False


def check_checkpoint_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="samlabel-check-checkpoint", description=__doc__)
    parser.add_argument("path", help="checkpoint file, e.g. FastSAM3D.pth or sam_med3d_turbo.pth")
    parser.add_argument("--model", choices=sorted(registered()), help="the model the file should be (default: any)")
    args = parser.parse_args(argv)
    return 0 if check_checkpoint(args.path, args.model) else 1


if __name__ == "__main__":
    sys.exit(check_checkpoint_main())
