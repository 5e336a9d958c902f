"""The app's --conf values, checked once at start-up: a typo or an impossible value stops the
server with a message, instead of starting it and answering 500 to every click."""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

import torch

from .registry import get_spec, registered

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_PROPAGATION_SECONDS = 3600.0
# The files training runs write, by model family (engine_auto: SAM3D's decoders; engine: the click models').
TRAINED_SUFFIX = {"auto3d": ".model", "clicks3d": ".pth"}
# MONAI Label's own keys, passed through untouched.
MONAILABEL_KEYS = ("server_mode", "auth_token", "preload", "skip_scoring", "skip_strategies", "skip_trainers")
OUR_KEYS = {
    "models": 'comma-separated model names, or "all" (default: every model whose checkpoint is present)',
    "device": "cpu or cuda (default: cuda when available)",
    "dtype": "float32, bfloat16 or float16: the models' compute precision (default float32)",
    "<model>_dtype": "that model's precision instead of dtype (e.g. medsam_dtype bfloat16)",
    "ensemble_dtype": "float32, bfloat16 or float16: the self-ensemble members' precision (default: the model's)",
    "image_cache_mb": "memory for loaded images in MB (default 2048)",
    "propagation_seconds": "time bound of the 2D models' 3D propagation tasks (default 60)",
    "<model>_checkpoint": "a checkpoint path instead of model/<official file name>",
    "<model>_weights": 'trained models: "latest" (default: the newest trained weights, else the official ones), '
                       '"official", or a file name under <checkpoint folder>/trained/ (SAM3D: a .model file) or '
                       '<checkpoint folder>/trained/<model>/ (FastSAM3D, SAM-Med3D: a .pth file)',
    "sam_vit_b_checkpoint": "SAM3D's encoder, Meta's SAM ViT-B, instead of model/sam_vit_b_01ec64.pth",
    "upload_mb": "largest request body in MB; larger ones get 413 (default 2048)",
}


class ConfError(ValueError):
    """A --conf value the app cannot run with; the message says which and why."""


@dataclass(frozen=True)
class AppSettings:
    models: Tuple[str, ...]  # the models asked for (all registered ones by default)
    explicit: bool  # models named by --conf models: registered even without their checkpoint
    device: str
    dtype: torch.dtype
    model_dtypes: Mapping[str, torch.dtype]  # <model>_dtype: a model's own precision instead of dtype
    ensemble_dtype: Optional[torch.dtype]  # None: each model's own
    image_cache_bytes: float
    propagation_seconds: float
    upload_mb: float

    def dtype_of(self, model: str) -> torch.dtype:
        """The model's compute precision: <model>_dtype, else dtype."""
        return self.model_dtypes.get(model, self.dtype)

    @classmethod
    def from_conf(cls, conf: Mapping[str, str]) -> "AppSettings":
        problems: List[str] = []
        models = registered()
        checkpoint_keys = {f"{name}_checkpoint" for name in models}
        weights_suffix = {f"{name}_weights": TRAINED_SUFFIX[spec.family] for name, spec in models.items()
                          if "training" in spec.tasks or spec.family == "clicks3d"}
        checkpoint_keys |= set(weights_suffix)
        dtype_keys = {f"{name}_dtype": name for name in models}
        checkpoint_keys |= set(dtype_keys)
        for key in conf:
            if key not in OUR_KEYS and key not in checkpoint_keys and key not in MONAILABEL_KEYS:
                problems.append(f"unknown key {key!r}")

        for key in sorted(k for k in conf if k in weights_suffix):
            value, suffix = str(conf[key]), weights_suffix[key]
            if value not in ("latest", "official") and (not value.endswith(suffix) or Path(value).name != value):
                problems.append(f"{key} must be latest, official or the name of a {suffix} file, got {value!r}")

        requested = [m.strip() for m in str(conf.get("models", "")).split(",") if m.strip()]
        explicit = bool(requested) and requested != ["all"]
        for name in requested if explicit else []:
            try:
                get_spec(name)
            except KeyError as error:
                problems.append(f"models: {error.args[0]}")

        device = str(conf.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.split(":")[0] not in ("cpu", "cuda"):
            problems.append(f"device must be cpu or cuda, got {device!r}")
        elif device.startswith("cuda") and not torch.cuda.is_available():
            problems.append(f"device {device!r}: this machine has no CUDA device (torch {torch.__version__})")

        dtype_names = {key: str(conf[key]) for key in ["dtype", "ensemble_dtype", *dtype_keys] if key in conf}
        for key, name in dtype_names.items():
            if name not in DTYPES:
                problems.append(f"{key} must be one of {', '.join(DTYPES)}, got {name!r}")
        image_cache_mb = _number(conf, "image_cache_mb", 2048, 1, math.inf, problems)
        seconds = _number(conf, "propagation_seconds", 60, 0, MAX_PROPAGATION_SECONDS, problems)
        upload_mb = _number(conf, "upload_mb", 2048, 0.001, math.inf, problems)
        if problems:
            known = "; ".join(f"{k}: {v}" for k, v in OUR_KEYS.items())
            raise ConfError("invalid --conf: " + "; ".join(problems) + f". Known keys: {known}")
        return cls(models=tuple(requested if explicit else models), explicit=explicit, device=device,
                   dtype=DTYPES.get(dtype_names.get("dtype"), torch.float32),
                   model_dtypes={model: DTYPES[dtype_names[key]] for key, model in dtype_keys.items() if key in dtype_names},
                   ensemble_dtype=DTYPES.get(dtype_names.get("ensemble_dtype")), image_cache_bytes=image_cache_mb * 2**20, propagation_seconds=seconds,
                   upload_mb=upload_mb)


def _number(conf: Mapping[str, str], key: str, default: float, low: float, high: float, problems: List[str]) -> float:
    try:
        value = float(conf.get(key, default))
    except (TypeError, ValueError):
        value = math.nan
    if not (low <= value <= high):  # NaN fails too
        problems.append(f"{key} must be a number from {low:g} to {high:g}, got {conf.get(key)!r}")
        return default
    return value
