"""The one device boundary of the predictors: what runs on the model's device, and how results
come back to the host as float32 numpy arrays. Reduced precision is autocast (the weights stay
float32), so norms and softmax keep float32 where autocast says so."""

from contextlib import contextmanager

import numpy as np
import torch


def model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to dtype on the model's device; off for float32."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


@contextmanager
def compute_dtype(predictor, dtype: torch.dtype):
    """The predictor's autocast precision for the calls made within (its owner holds the model
    lock, so no other call sees it)."""
    saved, predictor.dtype = predictor.dtype, dtype
    try:
        yield
    finally:
        predictor.dtype = saved


def to_host(*tensors: torch.Tensor) -> tuple:
    """Device tensors as float32 numpy arrays on the host: the only way results leave the device."""
    return tuple(t.detach().float().cpu().numpy() for t in tensors)


def on_host(value):
    """A state dict (nested dicts, lists and tuples of tensors) with every tensor detached on the
    CPU: what a checkpoint file holds, whatever device trained it."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: on_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_host(v) for v in value)
    return value


def to_device(array, device: torch.device, dtype=np.float32) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array, dtype=dtype), device=device)
