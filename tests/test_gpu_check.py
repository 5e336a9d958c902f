"""bench/gpu_check.sh, the prepared GPU script, runs here in its --dry-run form (small
configurations on the CPU), so it cannot rot between the sessions that are lent a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_reports_every_model_and_dtype(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    expected = {f"{m}/{d}" for m in ("fastsam3d", "sam_med3d", "medsam", "sam_med2d") for d in ("float32", "bfloat16")}
    sam3d = {f"sam3d_synapse/{d}" for d in ("float32", "bfloat16")}
    assert set(report["networks"]) == expected | sam3d and set(report["clicks"]) == expected
    for name in sam3d:
        assert set(report["networks"][name]) == {"encoder_slice_s", "decoder_window_s", "train_iteration_s"}
        assert all(t > 0 for t in report["networks"][name].values())
    distillation = report["distillation"]
    assert distillation["teacher_targets_s"] > 0 and set(distillation["student_iteration_s"]) == {"float32", "bfloat16"}
    assert all(t > 0 for t in distillation["student_iteration_s"].values())
    for timings in report["clicks"].values():
        assert set(timings) == {"first_s", "next_s", "uncertainty_2_s", "uncertainty_4_s"}
        assert all(t > 0 for t in timings.values())
    assert "| fastsam3d | bfloat16 |" in run.stdout and "| sam_med3d -> fastsam3d |" in run.stdout
