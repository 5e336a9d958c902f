"""Reading an image when a client opens it, not when it first clicks.

Most of a first click is reading and decompressing the image (and, on a DICOMweb store, fetching
the series and converting it). The server routes call `Prefetcher.open` when a client opens an
image: Slicer's download of a datastore image (GET /datastore/image) or its upload (PUT /session/),
OHIF's first request for a series through the DICOMweb proxy, and the active-learning "next
sample". One background thread then reads it into the app's image cache (samlabel.images), which
the first click finds loaded.

Then the warm-ups run on the image read: further work a first click would otherwise do, such as
a 2D model encoding the likely slice (engine2d.SliceSegmenter.prefetch_slice, which runs only where
that is cheap).

A prefetch never competes with a click: the worker starts an image, and each warm-up, only while
no inference is running (the infer route holds `inference()` around each one). Pending images are
bounded (the oldest are dropped) and the caches that hold the results are bounded.
"""

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Hashable, Optional, Sequence

logger = logging.getLogger(__name__)

MAX_PENDING = 8  # images waiting to be read; a client opening more drops the oldest
REMEMBERED = 256  # images read lately: opened again (OHIF asks a series' frames one by one), not read again


class Prefetcher:
    def __init__(self, read: Callable[[str], object], warm_ups: Sequence[Callable[[str], Optional[str]]] = (),
                 max_pending: int = MAX_PENDING):
        """read(path): loads the image at path into the cache the engines read from; warm_ups:
        warm_up(path) -> what it did (for the log) or None (nothing), after the read."""
        self._read = read
        self._warm_ups = tuple(warm_ups)
        self._max_pending = max_pending
        self._pending: "OrderedDict[Hashable, Callable[[], str]]" = OrderedDict()
        self._read_lately: "OrderedDict[Hashable, None]" = OrderedDict()
        self._inferences = 0
        self._changed = threading.Condition()
        threading.Thread(target=self._work, name="samlabel-prefetch", daemon=True).start()

    def open(self, key: Hashable, locate: Callable[[], str]) -> None:
        """A client opened image `key`; locate() gives its file (it may download it) and runs in the worker."""
        with self._changed:
            if key in self._read_lately:  # the image cache keeps it while it fits; a changed file is reread there
                return
            self._pending.pop(key, None)
            self._pending[key] = locate
            while len(self._pending) > self._max_pending:
                dropped, _ = self._pending.popitem(last=False)
                logger.info(f"prefetch: {dropped} dropped ({self._max_pending} images pending)")
            self._changed.notify_all()

    @contextmanager
    def inference(self):
        """Held around each inference: no prefetch starts meanwhile."""
        with self._changed:
            self._inferences += 1
        try:
            yield
        finally:
            with self._changed:
                self._inferences -= 1
                self._changed.notify_all()

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending and not self._inferences)
                key, locate = self._pending.popitem(last=False)
            started = time.perf_counter()
            try:
                path = locate()
                self._read(path)
            except Exception as error:  # noqa: BLE001 - a prefetch that fails costs the click its read, nothing else
                logger.info(f"prefetch: {key} not read: {type(error).__name__}: {error}")
                continue
            logger.info(f"prefetched {key} in {time.perf_counter() - started:.2f} s")
            with self._changed:
                self._read_lately[key] = None
                while len(self._read_lately) > REMEMBERED:
                    self._read_lately.popitem(last=False)
            for warm_up in self._warm_ups:
                with self._changed:
                    self._changed.wait_for(lambda: not self._inferences)
                try:
                    done = warm_up(path)
                except Exception as error:  # noqa: BLE001 - as a failed read: the click does the work
                    logger.info(f"prefetch: {key}: warm-up failed: {type(error).__name__}: {error}")
                    continue
                if done:
                    logger.info(f"prefetch: {key}: {done}")
