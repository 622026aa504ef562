from __future__ import annotations

import threading
import time

import pytest

from pixelvote.engine.prefetch import prefetch


def test_prefetch_keeps_order_and_runs_ahead_in_another_thread():
    made: list[tuple[int, str]] = []

    def produce():
        for i in range(6):
            made.append((i, threading.current_thread().name))
            yield i

    it = prefetch(produce(), depth=2)
    assert next(it) == 0
    time.sleep(0.3)
    # while the consumer holds item 0, the producer has made the next ones, up to the queue's depth
    assert 3 <= len(made) <= 4
    assert all(name == "pixelvote-decode" for _, name in made)
    assert [0, *it] == list(range(6))


def test_an_error_while_producing_reaches_the_consumer_after_the_items_before_it():
    def produce():
        yield 1
        raise OSError("disk gone")

    it = prefetch(produce())
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)


def test_stopping_early_stops_the_producer():
    produced = []

    def produce():
        for i in range(1000):
            produced.append(i)
            yield i

    it = prefetch(produce(), depth=2)
    assert next(it) == 0
    it.close()  # what a for loop's exception does to the generator
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n <= 4
    assert not any(t.name == "pixelvote-decode" for t in threading.enumerate())
