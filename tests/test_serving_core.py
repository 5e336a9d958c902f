"""The serving core's shape: every model served through its family's TaskConfig, every click
task's post-transforms, the interaction advancing only with a written result, and the module
boundaries the design promises (checked on the source, so they cannot silently erode)."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import HTTPException

from samlabel.configs import config_families
from samlabel.images import ImageCache
from samlabel.registry import get_spec, registered
from samlabel.settings import AppSettings, ConfError
from samlabel.tasks import base
from samlabel.tasks.clicks import ClickSegmentation
from samlabel.transforms import EnsembleStatisticsd, MaskOnImaged, StdOnImaged, UncertaintyBandsd
from test_engine import segmenter, volume_path  # noqa: F401 - fixture

LIB = Path(__file__).resolve().parents[1] / "lib" / "samlabel"
TESTS = Path(__file__).resolve().parent


def served_tasks(tmp_path):
    settings = AppSettings.from_conf({})
    families, images, tasks = config_families(), ImageCache(), {}
    for name, spec in registered().items():
        config = families[spec.family]()
        config.init(name, str(tmp_path), {}, None, settings=settings, images=images)
        tasks.update(config.infer())
    return tasks


def test_every_model_is_served_by_its_family_config_with_its_task_kinds(tmp_path):
    tasks = served_tasks(tmp_path)
    for name, spec in registered().items():
        task_of = {"clicks": name, "uncertainty": f"{name}_uncertainty", "propagation": f"{name}_3d", "segmentation": name}
        assert {kind for kind in spec.tasks if kind in task_of and task_of[kind] in tasks} == set(spec.tasks) - {"training"}
        assert tasks[name].engine.spec is spec and isinstance(tasks[name].engine, spec.engine)
        assert "UNAVAILABLE" in tasks[name].description  # no checkpoint in tmp_path, and it says so


def test_a_model_can_have_its_own_precision(tmp_path):
    """--conf medsam_dtype bfloat16: MedSAM's engine in bfloat16, the others at dtype; the ensemble
    members at each model's own unless ensemble_dtype says otherwise."""
    settings = AppSettings.from_conf({"dtype": "float32", "medsam_dtype": "bfloat16"})
    engines = {}
    for name in ("medsam", "fastsam3d"):
        config = config_families()[get_spec(name).family]()
        config.init(name, str(tmp_path), {}, None, settings=settings, images=ImageCache())
        engines[name] = config.engine
    assert (engines["medsam"].dtype, engines["medsam"].ensemble_dtype) == (torch.bfloat16, torch.bfloat16)
    assert (engines["fastsam3d"].dtype, engines["fastsam3d"].ensemble_dtype) == (torch.float32, torch.float32)
    assert AppSettings.from_conf({"ensemble_dtype": "bfloat16"}).dtype_of("medsam") == torch.float32
    with pytest.raises(ConfError, match="medsam_dtype must be one of"):
        AppSettings.from_conf({"medsam_dtype": "half"})


def test_every_click_task_post_transforms_hold_the_ensemble_statistics_and_the_mask(tmp_path):
    for name, task in served_tasks(tmp_path).items():
        if task.engine.spec.prompt is None:  # automatic models: their pipeline maps back (samlabel.autoseg)
            continue
        kinds = [type(t) for t in task.post_transforms()]
        assert kinds[:3] == [EnsembleStatisticsd, MaskOnImaged, StdOnImaged], name
        assert (UncertaintyBandsd in kinds) == name.endswith("_uncertainty"), name


def test_a_failed_write_leaves_the_interaction_as_it_was(volume_path, monkeypatch):  # noqa: F811
    engine = segmenter()
    task = ClickSegmentation(engine)
    request = {"image": volume_path, "foreground": [[150, 130, 20]], "client_id": "u", "result_extension": ".nrrd"}
    task(dict(request))
    key = ("u", volume_path, None)
    before = engine.interactions.get(key)

    def broken_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(base, "write_nrrd", broken_disk)
    with pytest.raises(HTTPException) as refused:
        task({**request, "foreground": [[150, 130, 20], [152, 131, 20]]})
    assert refused.value.status_code == 500 and "No space left" in refused.value.detail
    assert "request" in refused.value.detail  # names the request, whose traceback is in the log
    assert engine.interactions.get(key) is before and engine.latest_request("u", volume_path).foreground == ((150, 130, 20),)
    monkeypatch.undo()
    _, result = task({**request, "foreground": [[150, 130, 20], [152, 131, 20]]})
    assert result["window_reused"]  # the failed request did not start a new interaction either
    assert np.array_equal(engine.latest_request("u", volume_path).foreground, ((150, 130, 20), (152, 131, 20)))


def imported_modules(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield (node.module or "").split(".")[-1]
        elif isinstance(node, ast.Import):
            yield from (alias.name.split(".")[-1] for alias in node.names)


def test_the_2d_engine_does_not_import_the_3d_engine():
    for module in ("engine2d.py", "predictor2d.py"):
        assert not {"engine3d", "predictor", "geometry"} & set(imported_modules(LIB / module)), module


def test_engine_level_modules_do_not_need_monailabel():
    """bench/gpu_check.sh carries no monailabel: the engines, predictors and registry must not import it."""
    for module in ("engine.py", "engine2d.py", "engine3d.py", "predictor.py", "predictor2d.py", "registry.py",
                   "models.py", "request.py", "images.py", "device.py", "prompts.py", "uncertainty.py", "results.py"):
        assert "monailabel" not in set(imported_modules(LIB / module)), module


def test_no_test_assigns_a_private_attribute():
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and target.attr.startswith("_") and not target.attr.startswith("__"):
                        owner = target.value.id if isinstance(target.value, ast.Name) else ""
                        assert owner == "self", f"{path.name}:{node.lineno} assigns {owner}.{target.attr}"
