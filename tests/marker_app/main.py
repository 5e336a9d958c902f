"""The FastSAM3D app plus a test-double 3D model, ``click_marker``, for the front-end tests.

Its network marks a ball of RADIUS model voxels (1.5 mm each) around the newest positive
point prompt; everything around it is the real app: the registry entry, the checkpoint loader
(``click_marker.pth`` holds the radius), the window placement, resampling and read-back, the
uncertainty tasks and the writers. So a mask centred on the clicked voxel shows that the
click and the result made the whole round trip through our coordinate code.
"""

import importlib.util
from pathlib import Path

from click_marker import SPEC  # this folder is on sys.path while monailabel loads the app

from samlabel.registry import register_model

_app = Path(__file__).resolve().parents[2] / "apps" / "fastsam3d" / "main.py"
_spec = importlib.util.spec_from_file_location("fastsam3d_app_main", _app)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
FastSAM3DApp = _module.FastSAM3DApp  # found by monailabel as this app's MONAILabelApp

register_model(SPEC)
