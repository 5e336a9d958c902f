"""The marker app (the FastSAM3D app plus the ``click_marker`` test double, as tests/marker_app)
plus ``hold``: a test-double task that blocks until the test creates ``release-<token>`` in
the folder named by the environment variable SAMLABEL_TEST_HOLD_DIR (at most HOLD_MAX_S),
after creating ``started-<token>`` there. A long inference whose end the test decides, for checking the order
in which the server finishes requests, not their times."""

import importlib.util
import os
import time
from pathlib import Path

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from samlabel.registry import register_model

HOLD_MAX_S = 60
_ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_click_marker = _load(_ROOT / "tests" / "marker_app" / "click_marker.py", "click_marker")
register_model(_click_marker.SPEC)
_app = _load(_ROOT / "apps" / "fastsam3d" / "main.py", "fastsam3d_app_main")


class HoldTask(InferTask):
    def __init__(self, folder: str):
        super().__init__(type=InferType.OTHERS, labels=[], dimension=3, description="test double: holds until released")
        self.folder = Path(folder)

    def is_valid(self) -> bool:
        return True

    def __call__(self, request):
        token = str(request.get("token", "0"))
        (self.folder / f"started-{token}").touch()
        release, deadline = self.folder / f"release-{token}", time.monotonic() + HOLD_MAX_S
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return None, {"released": release.exists()}


# MONAILabelApp named as a base too: MONAI Label's loader takes a class with a direct base of that name.
class HoldApp(_app.FastSAM3DApp, MONAILabelApp):
    def init_infers(self):
        infers = super().init_infers()
        infers["hold"] = HoldTask(os.environ["SAMLABEL_TEST_HOLD_DIR"])
        return infers
