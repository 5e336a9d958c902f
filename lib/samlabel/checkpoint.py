"""Loading the official checkpoint files safely and checking them against our networks.

Files are read with torch.load(weights_only=True): only tensors, containers and an allow-list
of plain data types are unpickled, never arbitrary objects. The allow-list covers what the
official training scripts save next to the weights (argparse.Namespace under 'args', the
scheduler's Counter of milestones, numpy scalars in the loss history).
"""

import argparse
import collections
import hashlib
import pickle
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .registry import ModelSpec

try:
    from numpy._core.multiarray import scalar as numpy_scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar as numpy_scalar

SAFE_GLOBALS = [
    argparse.Namespace,
    collections.Counter,
    np.dtype,
    (numpy_scalar, "numpy.core.multiarray.scalar"),  # as pickled by numpy 1.x
    (numpy_scalar, "numpy._core.multiarray.scalar"),  # as pickled by numpy 2.x
    *{type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)},
]
MAX_LISTED = 5  # mismatches named in an error


class CheckpointError(Exception):
    """A checkpoint file that is missing, unreadable, or not the model it should be."""


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _allow_training_state() -> None:
    """Add SAFE_GLOBALS to torch's process-wide allow-list. Added, never removed: the
    torch.serialization.safe_globals context manager removes its types on exit, which strips
    them from the loads that other threads (the app preloads every model at once) are running."""
    torch.serialization.add_safe_globals(SAFE_GLOBALS)  # a set union: repeating it is harmless


_allow_training_state()


def read_checkpoint(path) -> object:
    """The unpickled top-level object of a checkpoint file, loaded on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    _allow_training_state()  # again, in case other code cleared torch's list since import
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever torch fails with on a bad file, the file is the problem
        refused = _disallowed_globals(path, error)
        if refused:
            names = ", ".join(refused[:MAX_LISTED])
            names += f" and {len(refused) - MAX_LISTED} more" if refused[MAX_LISTED:] else ""
            one = len(refused) == 1
            raise CheckpointError(f"{path}: refused to unpickle: it contains {names}, which {'is' if one else 'are'} not "
                                  f"weights data (unpickling {'it' if one else 'them'} could run code); "
                                  "the file was not loaded") from None
        raise _unreadable(path, error) from None


def _disallowed_globals(path, error) -> list:
    """The pickled globals that weights_only refused; empty when the file failed for another reason."""
    if not isinstance(error, pickle.UnpicklingError):
        return []
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:  # every refused global of a zip-format file, not only the first one torch stopped at
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - the legacy (non-zip) format: only torch's message names it
        found = []
    found = found or re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]
    return sorted({name for name in found if name not in allowed})


def _reason(error) -> str:
    """The first sentence of torch's error, without its advice: torch's weights_only errors suggest
    retrying with weights_only=False, i.e. running whatever code the file holds; never pass that on."""
    advice = ("weights_only", "Weights only load failed", "Check the documentation")
    for line in str(error).splitlines():
        line = line.strip()
        if line and not any(phrase in line for phrase in advice):
            return line.split(". ")[0].rstrip(".")
    return type(error).__name__  # e.g. torch's EOFError on an empty file has no message


def _unreadable(path, error) -> CheckpointError:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as open_error:
        return CheckpointError(f"{path}: cannot be read: {open_error.strerror or open_error}")
    if not head:
        return CheckpointError(f"{path}: empty file (0 bytes), not a PyTorch checkpoint")
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated, corrupt, or not a checkpoint: "
                           f"it starts with {head!r}): {_reason(error)}")


def state_dict_of(checkpoint: object, spec: ModelSpec, path) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: under spec.checkpoint_key, or the file itself."""
    if isinstance(checkpoint, Mapping) and spec.checkpoint_key in checkpoint:
        checkpoint = checkpoint[spec.checkpoint_key]
    if isinstance(checkpoint, Mapping) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    entries = ", ".join(map(str, list(checkpoint)[:10])) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise CheckpointError(f"{path}: no state dict for {spec.title}; expected an entry {spec.checkpoint_key!r}, found: {entries}")


def expected_shapes(spec: ModelSpec) -> Dict[str, Tuple[int, ...]]:
    with torch.device("meta"):
        model = spec.builder()
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def mismatches(state: Mapping[str, torch.Tensor], expected: Mapping[str, Tuple[int, ...]]):
    """(missing keys, unexpected keys, [(key, file shape, model shape)])."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [(k, tuple(state[k].shape), expected[k]) for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    return missing, unexpected, wrong


def check_state_dict(state, spec: ModelSpec, path) -> None:
    """Raise one CheckpointError naming the first missing, unexpected and mis-shaped keys."""
    check_shapes(state, expected_shapes(spec), spec.title, path)


def check_shapes(state, expected: Mapping[str, Tuple[int, ...]], title: str, path) -> None:
    """check_state_dict against explicit {key: shape}; `title` names the model in the error."""
    missing, unexpected, wrong = mismatches(state, expected)
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected)):
        if items:
            parts.append(f"{len(items)} {label} keys (first: {', '.join(map(str, items[:MAX_LISTED]))})")
    if wrong:
        listed = "; ".join(f"{k}: file {list(f)} vs model {list(m)}" for k, f, m in wrong[:MAX_LISTED])
        parts.append(f"{len(wrong)} shape mismatches (first: {listed})")
    raise CheckpointError(f"{path} is not a {title} checkpoint: " + "; ".join(parts))


def load_model(spec: ModelSpec, path, device="cpu") -> nn.Module:
    """Build spec's network with the weights of `path` (float32, eval mode)."""
    state = state_dict_of(read_checkpoint(path), spec, path)
    check_state_dict(state, spec, path)
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = spec.builder()
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def find_checkpoint(spec: ModelSpec, model_dir, conf: Optional[Mapping[str, str]] = None) -> Path:
    """The checkpoint path: --conf <name>_checkpoint if given, else model_dir/<official file name>."""
    override = (conf or {}).get(f"{spec.name}_checkpoint")
    return Path(override) if override else Path(model_dir) / spec.checkpoint_file
