"""bench/load_test.py, tiny: two annotators (one Slicer-, one OHIF-shaped) with three FastSAM3D clicks each
on two images, through real nginx with affinity on two real replicas.

Shown: the report has its structure and no errors; every click reached a replica and was logged there;
each annotator stayed on one replica and every refinement continued its interaction on the cached
embedding (each annotator starts on its own image: its first click is the only miss). Round-robin's
nginx config differs from affinity's by the hash line only; which of the two serves more cache hits is
the benchmark's result, not asserted here (and a second cluster would not fit this test's minute).
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, load_module

replicas = load_module(REPO_ROOT / "scripts" / "replicas.py")
pytestmark = pytest.mark.skipif(bool(replicas.nginx_missing()), reason=f"needs nginx: {replicas.nginx_missing()}"
                                                                       " (make system-packages installs it where apt-get can)")


def test_round_robin_drops_only_the_hash(tmp_path):
    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    affinity = replicas.nginx_config(8000, urls, tmp_path)
    round_robin = replicas.nginx_config(8000, urls, tmp_path, balance="round-robin")
    assert replicas.AFFINITY in affinity and replicas.AFFINITY not in round_robin
    assert [line for line in affinity.splitlines() if line not in round_robin.splitlines()] == [f"        {replicas.AFFINITY}"]


def test_a_tiny_load_test_with_affinity(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "load_test.py"), "--annotators", "2", "--images", "2",
                           "--clicks", "3", "--think", "0,0.2", "--models", "fastsam3d", "--configs", "affinity",
                           "--json", str(out), "--work-dir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| configuration | replicas x threads | clicks | clicks/s | p50 (s) | p95 (s) | errors |" in done.stdout
    [result] = json.loads(out.read_text())["results"]
    assert result["replicas"] == 2 and result["balance"] == "affinity" and result["errors"] == {}
    assert result["clicks_sent"] == result["clicks"] == result["clicks_logged"] == 6
    assert 0 < result["p50_s"] <= result["p95_s"] and result["clicks_per_second"] > 0
    assert len(result["peak_rss_mb"]) == 2 and all(mb > 100 for mb in result["peak_rss_mb"])
    assert [a["kind"] for a in result["annotators_detail"]] == ["slicer", "ohif"]
    assert all(len(a["replicas"]) == 1 for a in result["annotators_detail"])
    assert result["embedding_hit_rate"] == result["interaction_continued_rate"] == 2 / 3
