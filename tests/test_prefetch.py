"""Reading images when they are opened (samlabel.prefetch): the same voxels as MONAI's loader,
never while an inference runs, and bounded however many images are opened."""

import threading

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImage

from samlabel.images import ImageCache
from samlabel.prefetch import MAX_PENDING, Prefetcher


def write_volume(path, seed: int, shape=(23, 17, 11)):
    affine = np.array([[0.0, -0.9, 0.1, 12.0], [1.3, 0.0, 0.0, -40.0], [0.0, 0.2, 2.5, 7.0], [0, 0, 0, 1]])
    data = np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


class Recorder:
    """read() for the prefetcher: loads into the cache, records the order, signals each read."""

    def __init__(self, images: ImageCache):
        self.images, self.order, self.done = images, [], threading.Semaphore(0)

    def __call__(self, path: str):
        self.images.get(path)
        self.order.append(path)
        self.done.release()


def test_a_prefetched_image_is_monai_labels_read_of_the_file(tmp_path):
    path = write_volume(tmp_path / "oblique.nii.gz", 1)
    images = ImageCache()
    recorder = Recorder(images)
    Prefetcher(recorder).open("oblique", lambda: path)
    assert recorder.done.acquire(timeout=60)
    assert images.holds(path)
    reference = LoadImage(image_only=True, dtype=None)(path)  # what MONAI Label's own loader gives
    cached = images.get(path)
    assert cached.array.dtype == np.asarray(reference).dtype
    assert np.array_equal(cached.array, np.asarray(reference))
    assert np.array_equal(cached.affine, np.asarray(reference.affine, dtype=np.float64))


def test_no_prefetch_starts_while_an_inference_runs(tmp_path):
    """Order of completion: the inference finishes first, however long the worker has been waiting."""
    path = write_volume(tmp_path / "next.nii.gz", 2)
    recorder = Recorder(ImageCache())
    prefetcher = Prefetcher(recorder)
    with prefetcher.inference():
        prefetcher.open("next", lambda: path)
        assert not recorder.done.acquire(timeout=0.5)  # a worker that ignored the inference would read it now
        recorder.order.append("inference finished")
    assert recorder.done.acquire(timeout=60)
    assert recorder.order == ["inference finished", path]


def test_twenty_opened_images_stay_within_the_bounds(tmp_path):
    paths = [write_volume(tmp_path / f"image{n}.nii.gz", n) for n in range(20)]
    one = ImageCache().get(paths[0]).array.nbytes
    images = ImageCache(max_bytes=3 * one)
    recorder = Recorder(images)
    prefetcher = Prefetcher(recorder)
    with prefetcher.inference():  # all twenty are opened before any is read
        for n, path in enumerate(paths):
            prefetcher.open(f"image{n}", lambda path=path: path)
    for _ in range(MAX_PENDING):
        assert recorder.done.acquire(timeout=60)
    assert not recorder.done.acquire(timeout=0.5)
    assert recorder.order == paths[-MAX_PENDING:]  # the oldest pending were dropped
    assert images.bytes <= 3 * one and [images.holds(p) for p in paths[-3:]] == [True] * 3
    assert not any(images.holds(p) for p in paths[:-3])


@pytest.mark.parametrize("failure", [FileNotFoundError("gone"), ValueError("not a volume")])
def test_a_failed_prefetch_leaves_the_worker_serving(tmp_path, failure):
    path = write_volume(tmp_path / "after.nii.gz", 3)
    recorder = Recorder(ImageCache())
    prefetcher = Prefetcher(recorder)

    def fail():
        raise failure

    prefetcher.open("broken", fail)
    prefetcher.open("after", lambda: path)
    assert recorder.done.acquire(timeout=60) and recorder.order == [path]


def test_warm_ups_follow_the_read_and_wait_for_inferences(tmp_path):
    """Order of completion: a warm-up runs after its image's read, and not while an inference runs."""
    path = write_volume(tmp_path / "warm.nii.gz", 4)
    recorder = Recorder(ImageCache())
    warmed = threading.Semaphore(0)

    def warm_up(opened):
        recorder.order.append(f"warm-up {opened}")
        warmed.release()
        return "encoded"

    prefetcher = Prefetcher(recorder, [warm_up])
    inference = prefetcher.inference()
    inference.__enter__()
    prefetcher.open("warm", lambda: path)
    assert not recorder.done.acquire(timeout=0.5)
    inference.__exit__(None, None, None)
    assert recorder.done.acquire(timeout=60)
    assert warmed.acquire(timeout=60)
    assert recorder.order == [path, f"warm-up {path}"]


def test_a_failed_warm_up_leaves_the_worker_serving(tmp_path):
    paths = [write_volume(tmp_path / f"w{n}.nii.gz", n) for n in (5, 6)]
    recorder = Recorder(ImageCache())

    def broken(opened):
        raise RuntimeError("out of memory")

    prefetcher = Prefetcher(recorder, [broken])
    prefetcher.open("w5", lambda: paths[0])
    prefetcher.open("w6", lambda: paths[1])
    assert recorder.done.acquire(timeout=60) and recorder.done.acquire(timeout=60)
    assert recorder.order == paths
