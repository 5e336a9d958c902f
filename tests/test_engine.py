"""The click engine: caches, interaction state, window placement, concurrency. A small seeded
model with the official structure stands in for the full-size network (same 128^3 window)."""

import os
import threading

import nibabel as nib
import numpy as np
import pytest
import torch

from samlabel.cache import LRUCache
from samlabel.engine3d import ClickSegmenter3D
from samlabel.errors import InputError
from samlabel.images import ImageCache
from samlabel.modeling import build_fastsam3d
from samlabel.predictor import SamPredictor3D, normalise_intensity
from samlabel.registry import get_spec
from samlabel.request import ClickRequest
from samlabel.seeded import seeded_state_dict


def small_predictor():
    model = build_fastsam3d(embed_dim=48, depth=3, num_heads=2, prompt_dim=48)
    model.load_state_dict(seeded_state_dict({k: v.shape for k, v in model.state_dict().items()}, 5))
    return SamPredictor3D(model)


def segmenter(images=None, **options):
    return ClickSegmenter3D(get_spec("fastsam3d"), images=images, predictor=small_predictor(), **options)


def request(foreground, background=(), client="user", **options) -> ClickRequest:
    return ClickRequest(foreground=tuple(map(tuple, foreground)), background=tuple(map(tuple, background)), client=client,
                        **options)


@pytest.fixture(scope="module")
def volume_path(tmp_path_factory):
    """An anisotropic LPS volume of 300 x 260 x 40 voxels (240 x 208 x 100 mm): wider than the window."""
    path = tmp_path_factory.mktemp("engine") / "volume.nii.gz"
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    i, j, k = np.meshgrid(*(np.arange(n) for n in (300, 260, 40)), indexing="ij")
    data = (100 * np.sin(i / 9.0) * np.cos(j / 13.0) + 3 * k).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def test_lru_cache_is_bounded_by_cost():
    cache = LRUCache(10, cost=len)
    cache.put("a", "xxxx")
    cache.put("b", "yyyy")
    assert cache.get("a") == "xxxx"  # a is now the most recent
    cache.put("c", "zzzz")  # 12 > 10: the least recent (b) goes
    assert cache.get("b") is None and cache.get("a") == "xxxx" and cache.get("c") == "zzzz"
    cache.put("huge", "w" * 50)  # larger than the capacity on its own: kept alone
    assert len(cache) == 1 and cache.get("huge")


def test_image_cache_reloads_a_changed_file(tmp_path):
    path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), str(path))
    images = ImageCache()
    first = images.get(str(path))
    assert images.get(str(path)) is first  # cached
    nib.save(nib.Nifti1Image(np.ones((4, 5, 7), np.int16), np.eye(4)), str(path))
    second = images.get(str(path))
    assert second.array.shape == (4, 5, 7) and second.array.sum() == 4 * 5 * 7


def test_image_cache_reloads_a_file_rewritten_with_the_same_size_and_mtime(tmp_path):
    path = tmp_path / "image.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), str(path))
    images = ImageCache()
    first = images.get(str(path))
    mtime = os.stat(path).st_mtime_ns
    nib.save(nib.Nifti1Image(np.full((4, 5, 6), 7, np.int16), np.eye(4)), str(path))  # same size
    os.utime(path, ns=(mtime, mtime))  # and the same mtime: the changed ctime tells
    assert os.stat(path).st_size == first.key[1] and os.stat(path).st_mtime_ns == first.key[2]
    assert images.get(str(path)).array.max() == 7


def test_clicks_in_the_image():
    assert request([[1, 2, 3]], [[0, 0, 0]]).clicks_in((4, 4, 4)) == [((1, 2, 3), 1), ((0, 0, 0), 0)]
    assert request([[3.0, 3, 3]]).clicks_in((4, 4, 4)) == [((3, 3, 3), 1)]
    for foreground, background, message in (([[4, 0, 0]], [], "outside"), ([[0, 0, -1]], [], "outside"),
                                            ([], [[1, 1, 1]], "foreground")):
        with pytest.raises(InputError, match=message):
            request(foreground, background).clicks_in((4, 4, 4))


def test_intensity_normalisation_is_the_official_z_score_over_positive_voxels():
    window = torch.tensor([-5.0, 0.0, 1.0, 2.0, 3.0, 6.0])
    positive = np.array([1.0, 2.0, 3.0, 6.0])
    expected = (window.numpy() - positive.mean()) / positive.std(ddof=1)
    assert np.allclose(normalise_intensity(window).numpy(), expected)
    flat = normalise_intensity(torch.full((5,), -3.0))  # nothing > 0, no spread: centred, not divided by 0
    assert torch.isfinite(flat).all() and flat.abs().max() == 0


def test_second_click_in_the_window_runs_only_the_decoder(volume_path):
    engine = segmenter()
    first = engine.segment(volume_path, request([[150, 130, 20]], []))
    second = engine.segment(volume_path, request([[150, 130, 20], [155, 128, 21]], [[140, 120, 20]]))
    assert engine.encoder_runs == 1
    assert second.info["window_reused"] and second.info["embedding_reused"]
    assert np.array_equal(second.geometry.window.affine, first.geometry.window.affine)
    # The mask prompt was the first click's logits: the same decode by hand gives the same mask.
    predictor = engine.predictor()
    stored = engine.interactions.get(("user", volume_path, None))
    points = first.geometry.window.to_window(nib.affines.apply_affine(
        nib.load(volume_path).affine, [[150, 130, 20], [155, 128, 21], [140, 120, 20]]))
    previous_logits, _ = predictor.predict(points[:1], np.array([1]), np.zeros((1, 1, 32, 32, 32), np.float32))
    expected, _ = predictor.predict(points, np.array([1, 1, 0]), previous_logits)
    assert np.allclose(stored.low_res_logits, expected, atol=1e-5)


def test_click_leaving_the_window_moves_it(volume_path):
    engine = segmenter()
    engine.segment(volume_path, request([[60, 130, 20]], []))
    moved = engine.segment(volume_path, request([[60, 130, 20], [200, 130, 20]], []))  # 112 mm along i
    assert not moved.info["window_reused"] and engine.encoder_runs == 2
    assert moved.geometry.window.contains(nib.affines.apply_affine(nib.load(volume_path).affine, [[60, 130, 20], [200, 130, 20]])).all()


def test_clicks_wider_than_the_window_keep_the_newest(volume_path):
    engine = segmenter()
    engine.segment(volume_path, request([[5, 130, 20]], []))
    wide = engine.segment(volume_path, request([[5, 130, 20], [295, 130, 20]], []))  # 232 mm apart > 190.5 mm
    affine = nib.load(volume_path).affine
    assert wide.geometry.window.contains(nib.affines.apply_affine(affine, [[295, 130, 20]])).all()
    assert wide.info["clicks_outside_window"] == 1 and wide.info["clicks_used"] == 1


def test_removed_click_or_reset_starts_a_new_interaction(volume_path):
    engine = segmenter()
    engine.segment(volume_path, request([[150, 130, 20], [152, 131, 20]], []))
    fewer = engine.segment(volume_path, request([[150, 130, 20]], []))
    assert not fewer.info["window_reused"]  # a new window, centred on the remaining click
    again = engine.segment(volume_path, request([[150, 130, 20], [151, 129, 20]], [], reset=True))
    assert not again.info["window_reused"]


def test_bad_request_leaves_the_interaction_intact(volume_path):
    engine = segmenter()
    engine.segment(volume_path, request([[150, 130, 20]], []))
    with pytest.raises(InputError):
        engine.segment(volume_path, request([[150, 130, 20], [999, 0, 0]], []))
    after = engine.segment(volume_path, request([[150, 130, 20], [151, 131, 20]], []))
    assert after.info["window_reused"]


def test_two_clients_at_once_get_what_each_would_get_alone(volume_path):
    clicks = {"alice": [[150, 130, 20]], "bob": [[100, 90, 10]]}
    alone = {}
    for name, c in clicks.items():
        engine = segmenter()
        for _ in range(3):  # each repeat feeds the previous logits back
            alone[name] = engine.segment(volume_path, request(c, client=name)).mask
    engine = segmenter()
    results, errors = {}, []

    def click(name):
        try:
            for _ in range(3):
                results[name] = engine.segment(volume_path, request(clicks[name], client=name)).mask
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=click, args=(name,)) for name in clicks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for name in clicks:
        assert np.array_equal(results[name], alone[name])
