"""Decode the next batches in a thread while the current one is analysed.

Where no decoding process is worth starting (a 2-core CPU, where torch's threads take both cores), a thread
still overlaps the two: Pillow decodes and torch computes with the GIL released, so the decoding fills the
moments the analysis leaves a core idle, without a process's copying.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order, produced up to ``depth`` ahead by a background thread. An exception raised
    while producing is raised here; stopping early (an error, ``close()``) stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(obj: object) -> bool:
        while not stop.is_set():
            try:
                q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer
            put(_Failed(exc))
            return
        put(_DONE)

    thread = threading.Thread(target=fill, name="pixelvote-decode", daemon=True)
    thread.start()
    try:
        while True:
            obj = q.get()
            if obj is _DONE:
                return
            if isinstance(obj, _Failed):
                raise obj.exc
            yield obj
    finally:
        stop.set()
        thread.join()
