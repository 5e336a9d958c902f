"""One MONAI Label TaskConfig per model family (the radiology app's lib/configs pattern).

The app makes, for each model it serves, the config whose `family` is the model's registry
family; the config's infer() returns that model's tasks. A new kind of model is a new config
module here plus its registry entry and builder.
"""

import importlib
import pkgutil
from typing import Dict, Type

from .base import SamTaskConfig


def config_families() -> Dict[str, Type[SamTaskConfig]]:
    """family -> TaskConfig class, from every module of this package."""
    families = {}
    for module in pkgutil.iter_modules(__path__):
        loaded = importlib.import_module(f"{__name__}.{module.name}")
        for value in vars(loaded).values():
            if isinstance(value, type) and issubclass(value, SamTaskConfig) and value.family:
                families[value.family] = value
    return families
