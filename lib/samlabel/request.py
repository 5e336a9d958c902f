"""The one place where a click request's parameters are checked and typed.

Every parameter a front end sends (Slicer: `foreground`, `background`, `label`, `client_id`,
`reset_state`, `slice`, `roi`, `result_*`; OHIF: the clicks and `result_compress`; our task
options `uncertainty`, `ensemble_size`) is parsed here into a ClickRequest, or refused with an
InputError naming the parameter. Work per request is bounded here: clicks and ensemble size.
"""

import math
from dataclasses import dataclass
from typing import Hashable, List, Optional, Sequence, Tuple

from .errors import InputError

MAX_CLICKS = 1000  # far above any interaction; bounds the decoder's prompt tokens
MAX_ENSEMBLE = 256
MAX_ID_CHARS = 256
RESULT_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
RESULT_EXTENSIONS = (".nrrd", ".nii.gz", ".nii")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")

Click = Tuple[Tuple[int, int, int], int]  # ((i, j, k), 1 positive / 0 negative)


@dataclass(frozen=True)
class ClickRequest:
    foreground: Tuple[Tuple[float, float, float], ...] = ()
    background: Tuple[Tuple[float, float, float], ...] = ()
    client: Optional[str] = None  # who clicks: Slicer's client_id, else the connection or user
    label: Optional[str] = None  # which segment (Slicer)
    reset: bool = False
    ensemble_size: int = 0  # 0: no self-ensembling
    slice_index: Optional[int] = None  # 2D models: the k of the clicks (Slicer)
    roi: Optional[Tuple[float, ...]] = None  # 2D box models: [i_a, i_b, j_a, j_b, k_a, k_b] (Slicer)

    def interaction_key(self, image_path: str) -> Hashable:
        return self.client, image_path, self.label

    def clicks_in(self, shape: Sequence[int], need_positive: bool = True) -> List[Click]:
        """Integer voxel indices inside the image, positives first as the clients send them."""
        clicks = []
        for points, label in ((self.foreground, 1), (self.background, 0)):
            for point in points:
                index = tuple(int(round(c)) for c in point)
                if not all(0 <= c < n for c, n in zip(index, shape)):
                    raise InputError(f"click {list(index)} lies outside the image of size {list(shape)}")
                clicks.append((index, label))
        if need_positive and not any(label == 1 for _, label in clicks):
            raise InputError("at least one foreground (positive) click is needed")
        return clicks


def parse_click_request(data: dict) -> ClickRequest:
    """A ClickRequest from MONAI Label's request dict (query and JSON params merged)."""
    foreground, background = points(data, "foreground"), points(data, "background")
    if len(foreground) + len(background) > MAX_CLICKS:
        raise InputError(f"at most {MAX_CLICKS} clicks per request, got {len(foreground) + len(background)}")
    uncertainty = boolean(data, "uncertainty")
    return ClickRequest(
        foreground=foreground, background=background,
        client=identifier(data, "client_id"), label=identifier(data, "label"),
        reset=boolean(data, "reset_state"),
        ensemble_size=integer(data, "ensemble_size", 8, 1, MAX_ENSEMBLE) if uncertainty else 0,
        slice_index=optional_index(data, "slice"), roi=roi(data))


def points(data: dict, name: str) -> Tuple[Tuple[float, float, float], ...]:
    value = data.get(name)
    if value is None or value == "":
        return ()
    if not isinstance(value, (list, tuple)):
        raise InputError(f"`{name}` must be a list of [i, j, k] voxel indices, got {short(value)}")
    parsed = []
    for point in value:
        if not isinstance(point, (list, tuple)) or len(point) != 3 or not all(finite_number(c) for c in point):
            raise InputError(f"each click in `{name}` must be three voxel indices [i, j, k] (finite numbers), got {short(point)}")
        parsed.append(tuple(float(c) for c in point))
    return tuple(parsed)


def boolean(data: dict, name: str, default: bool = False) -> bool:
    value = data.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise InputError(f"`{name}` must be true or false, got {short(value)}")


def integer(data: dict, name: str, default: int, low: int, high: int) -> int:
    value = data.get(name, default)
    number = as_integer(value)
    if number is None or not low <= number <= high:
        raise InputError(f"`{name}` must be an integer from {low} to {high}, got {short(value)}")
    return number


def optional_index(data: dict, name: str) -> Optional[int]:
    value = data.get(name)
    if value is None or value == "":
        return None
    number = as_integer(value, strict=True)
    if number is None or number < 0:
        raise InputError(f"`{name}` must be a non-negative integer index, got {short(value)}")
    return number


def identifier(data: dict, name: str) -> Optional[str]:
    value = data.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or len(str(value)) > MAX_ID_CHARS:
        raise InputError(f"`{name}` must be a string of at most {MAX_ID_CHARS} characters, got {short(value)}")
    return str(value)


def roi(data: dict) -> Optional[Tuple[float, ...]]:
    value = data.get("roi")
    if value is None or value == "" or value == []:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 6 or not all(finite_number(v) for v in value):
        raise InputError(f"`roi` must be six finite voxel indices [i_a, i_b, j_a, j_b, k_a, k_b], got {short(value)}")
    return tuple(float(v) for v in value)


def result_options(data: dict) -> Tuple[Optional[str], Optional[str], bool]:
    """(result_extension, result_dtype, result_compress) as the writer takes them."""
    extension, dtype = data.get("result_extension") or None, data.get("result_dtype") or None
    if extension is not None and extension not in RESULT_EXTENSIONS:
        raise InputError(f"`result_extension` must be one of {', '.join(RESULT_EXTENSIONS)}, got {short(extension)}")
    if dtype is not None and dtype not in RESULT_DTYPES:
        raise InputError(f"`result_dtype` must be one of {', '.join(RESULT_DTYPES)}, got {short(dtype)}")
    return extension, dtype, boolean(data, "result_compress", True)


def finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def as_integer(value, strict: bool = False) -> Optional[int]:
    """An int from an int, an integral float (not when strict) or a string of digits; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and not strict and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
