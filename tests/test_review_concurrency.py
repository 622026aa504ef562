"""A live review server on 127.0.0.1: 8 clients x 200 decisions land exactly once; a kill loses nothing
acknowledged."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_review_fixtures import CLASSES, SPECS, live_server, make_review_out

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

H, W = 24, 32
CLIENTS, PER_CLIENT = 8, 200


def _mask_b64(seed: int) -> str:
    m = np.zeros((H, W), np.uint8)
    m[seed % H, :] = 255
    buf = io.BytesIO()
    Image.fromarray(m).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _body(client: int, i: int) -> dict:
    keys = list(SPECS)
    key = keys[(client * 7 + i) % len(keys)]
    body: dict = {"key": key, "reviewer": f"client{client}", "request_id": f"c{client}-{i:04d}-x"}
    kind = (client + i) % 4
    if kind == 0:
        body["action"] = "accept"
    elif kind == 1:
        body["action"] = "reject"
    elif kind == 2:
        body.update(action="relabel", label=CLASSES[i % 2])
    else:
        body.update(action="edit", label="benign", mask_png=_mask_b64(i))
    return body


@contextmanager
def server_process(out: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """``pixelvote review``'s code in a subprocess on 127.0.0.1, port chosen by the system."""
    code = ("import sys; from pixelvote.review.server import run_review; "
            "run_review(sys.argv[1], port=0, reviewer='srv', announce=lambda s: print(s, flush=True))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, f"the server did not announce its address: {line!r}"
        url = f"http://127.0.0.1:{m.group(1)}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.05)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _rows(out: Path) -> list[tuple]:
    conn = sqlite3.connect(out / "review.sqlite")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        sql = "SELECT id, request_id, image_key, reviewer, action FROM decisions ORDER BY id"
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_eight_clients_two_hundred_decisions_each_land_exactly_once(tmp_path: Path) -> None:
    out = make_review_out(tmp_path, size=(H, W))
    errors: list[str] = []
    acked: dict[str, int] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(CLIENTS)

    def client(c: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            barrier.wait()
            for i in range(PER_CLIENT):
                body = _body(c, i)
                r = http.post("/api/decisions", json=body)
                if r.status_code != 201:
                    errors.append(f"{body['request_id']}: {r.status_code} {r.text[:200]}")
                    continue
                with lock:
                    acked[body["request_id"]] = r.json()["decision"]["id"]

    t0 = time.monotonic()
    with server_process(out) as (_, url):
        threads = [threading.Thread(target=client, args=(c, url)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        elapsed = time.monotonic() - t0
        # retries of stored decisions are answered from the log, not written again
        with httpx.Client(base_url=url, timeout=30) as http:
            for c, i in ((0, 0), (3, 17), (7, 199)):
                r = http.post("/api/decisions", json=_body(c, i))
                assert r.status_code == 200 and r.json()["duplicate"]
            summary = http.get("/api/summary").json()
    assert not errors, errors[:5]
    rows = _rows(out)
    sent = {f"c{c}-{i:04d}-x" for c in range(CLIENTS) for i in range(PER_CLIENT)}
    assert len(rows) == CLIENTS * PER_CLIENT == summary["decisions"]
    assert [r[1] for r in rows if r[1] in sent] == [r[1] for r in rows] and {r[1] for r in rows} == sent
    assert len({r[1] for r in rows}) == len(rows)  # each exactly once
    assert {r[1]: r[0] for r in rows} == acked  # the id each client was told is the stored one
    for r in rows:
        assert r[3] == f"client{int(r[1][1:r[1].index('-')])}"
    for c in range(CLIENTS):  # each client's decisions were stored in the order it made them
        ids = [acked[f"c{c}-{i:04d}-x"] for i in range(PER_CLIENT)]
        assert ids == sorted(ids)
    print(f"{len(rows)} decisions from {CLIENTS} clients in {elapsed:.1f} s")


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_a_killed_server_loses_no_acknowledged_decision(tmp_path: Path) -> None:
    out = make_review_out(tmp_path, size=(H, W))
    acked: list[str] = []
    attempted: list[str] = []
    with server_process(out) as (proc, url):
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=url, timeout=5) as http:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    body = _body(i % CLIENTS, i)
                    body["request_id"] = f"kill-{i:05d}"
                    attempted.append(body["request_id"])
                    try:
                        r = http.post("/api/decisions", json=body)
                    except httpx.TransportError:
                        return  # the server is gone
                    if r.status_code == 201:
                        acked.append(body["request_id"])

        t = threading.Thread(target=client)
        t.start()
        deadline = time.monotonic() + 30
        while len(acked) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        stop.set()
        t.join(timeout=10)
    assert len(acked) >= 60
    stored = [r[1] for r in _rows(out)]
    assert set(acked) <= set(stored)  # nothing acknowledged was lost
    assert len(stored) <= len(acked) + 1  # at most the decision being written when killed
    assert stored == attempted[:len(stored)]
    with live_server_after_crash(out) as url:  # the database opens again and takes new decisions
        r = httpx.post(url + "/api/decisions", json={"key": "case 04", "action": "accept"})
        assert r.status_code == 201
    assert len(_rows(out)) == len(stored) + 1


@contextmanager
def live_server_after_crash(out: Path) -> Iterator[str]:
    from pixelvote.review.settings import ReviewSettings

    with live_server(ReviewSettings(out_dir=out)) as url:
        yield url
