"""The review desk's decision log: an append-only SQLite table in ``OUT/review.sqlite``.

Every decision is one row written in one ``BEGIN IMMEDIATE … COMMIT`` transaction, in WAL mode with
``synchronous=FULL``: a decision the server acknowledged survives a crash, a kill or a power cut, and a
kill in the middle of a write loses only that decision. Rows are never updated or deleted; an image's
current state is its latest row (highest ``id``), so several reviewers at once lose nothing: each
decision is kept, and the history shows who decided what and when.

Each row is complete: the label and the whole mask (a 0/255 PNG) the decision leaves the image with,
so what a reviewer accepted stays accepted even if the output folder is annotated again.

Only the standard library here: exporters read reviews without FastAPI.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pixelvote.errors import DataError

logger = logging.getLogger(__name__)

DB_FILE = "review.sqlite"
SCHEMA_VERSION = 1
ACTIONS = ("accept", "reject", "relabel", "edit")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id      TEXT UNIQUE,
    image_key       TEXT NOT NULL,
    action          TEXT NOT NULL CHECK (action IN ('accept', 'reject', 'relabel', 'edit')),
    label           TEXT NOT NULL,
    predicted_label TEXT,
    mask_png        BLOB NOT NULL,
    mask_area       INTEGER NOT NULL,
    width           INTEGER NOT NULL,
    height          INTEGER NOT NULL,
    based_on        INTEGER,
    reviewer        TEXT NOT NULL,
    created         TEXT NOT NULL,
    note            TEXT
);
CREATE INDEX IF NOT EXISTS decisions_by_key ON decisions (image_key, id);
"""
_COLUMNS = ("id, request_id, image_key, action, label, predicted_label, mask_area, width, height, "
            "based_on, reviewer, created, note")


@dataclass(frozen=True)
class Decision:
    """One stored decision (without its mask bytes; see :meth:`ReviewStore.mask_png`)."""

    id: int
    request_id: str | None
    key: str
    action: str
    label: str
    predicted_label: str | None
    mask_area: int
    width: int
    height: int
    based_on: int | None
    reviewer: str
    created: str
    note: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "request_id": self.request_id, "key": self.key, "action": self.action,
            "label": self.label, "predicted_label": self.predicted_label, "mask_area": self.mask_area,
            "width": self.width, "height": self.height, "based_on": self.based_on,
            "reviewer": self.reviewer, "created": self.created, "note": self.note,
        }


@dataclass(frozen=True)
class NewDecision:
    """What a reviewer decided, ready to store (the server has validated it against the record)."""

    key: str
    action: str
    label: str
    mask_png: bytes
    mask_area: int
    width: int
    height: int
    reviewer: str
    predicted_label: str | None = None
    based_on: int | None = None
    request_id: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class WriteResult:
    """The stored decision; ``duplicate`` when its ``request_id`` was already stored (a retry);
    ``intervening`` lists decisions on the same image made after the one the reviewer saw."""

    decision: Decision
    duplicate: bool
    intervening: tuple[Decision, ...] = ()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _row(r: tuple[Any, ...]) -> Decision:
    return Decision(*r)


class ReviewStore:
    """The decision log of one output folder. Thread-safe: one SQLite connection per thread.

    ``create=False`` opens an existing database only (readers such as exporters never create one).
    """

    def __init__(self, path: str | Path, *, create: bool = True, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if not create and not self.path.is_file():
            raise DataError("no review database", path=self.path, fix="run `pixelvote review` first.")
        try:
            conn = self._conn()
            conn.execute("PRAGMA journal_mode=WAL")
            with self._write(conn):  # executescript() would commit on its own
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(stmt)
                row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
                if row is None:
                    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) > SCHEMA_VERSION:
                    raise DataError(
                        f"review database has schema version {row[0]}, newer than this pixelvote's "
                        f"{SCHEMA_VERSION}",
                        path=self.path, fix="upgrade pixelvote.",
                    )
        except sqlite3.DatabaseError as exc:
            self.close()
            raise DataError(f"not a usable SQLite database ({exc})", path=self.path,
                            fix="the folder must be writable; move a damaged file away (its decisions "
                                "cannot be read).") from exc

    # -- connections ---------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            with self._lock:
                self._all.append(conn)
            conn.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a commit survives a power cut
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _write(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            with contextlib.suppress(sqlite3.Error):
                c.close()
        self._local = threading.local()

    def __enter__(self) -> ReviewStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------
    def add(self, d: NewDecision) -> WriteResult:
        """Store one decision in its own transaction; a repeated ``request_id`` stores nothing."""
        if d.action not in ACTIONS:
            raise ValueError(f"action: expected one of {ACTIONS} but got {d.action!r}")
        conn = self._conn()
        with self._write(conn):
            if d.request_id is not None:
                old = conn.execute(f"SELECT {_COLUMNS} FROM decisions WHERE request_id = ?",
                                   (d.request_id,)).fetchone()
                if old is not None:
                    return WriteResult(_row(old), duplicate=True)
            seen = d.based_on or 0
            intervening = tuple(_row(r) for r in conn.execute(
                f"SELECT {_COLUMNS} FROM decisions WHERE image_key = ? AND id > ? ORDER BY id",
                (d.key, seen))) if d.based_on is not None else ()
            cur = conn.execute(
                "INSERT INTO decisions (request_id, image_key, action, label, predicted_label, mask_png, "
                "mask_area, width, height, based_on, reviewer, created, note) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (d.request_id, d.key, d.action, d.label, d.predicted_label, sqlite3.Binary(d.mask_png),
                 d.mask_area, d.width, d.height, d.based_on, d.reviewer, _now(), d.note),
            )
            new = conn.execute(f"SELECT {_COLUMNS} FROM decisions WHERE id = ?", (cur.lastrowid,)).fetchone()
        logger.info("decision %d: %s %r -> %s by %s", new[0], d.action, d.key, d.label, d.reviewer)
        return WriteResult(_row(new), duplicate=False, intervening=intervening)

    # -- reading -------------------------------------------------------------------------------
    def latest(self) -> dict[str, Decision]:
        """The current decision of every reviewed image: ``{key: latest decision}``."""
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM decisions WHERE id IN (SELECT MAX(id) FROM decisions GROUP BY image_key)"
        ).fetchall()
        return {r[2]: _row(r) for r in rows}

    def latest_for(self, key: str) -> Decision | None:
        r = self._conn().execute(
            f"SELECT {_COLUMNS} FROM decisions WHERE image_key = ? ORDER BY id DESC LIMIT 1", (key,)
        ).fetchone()
        return None if r is None else _row(r)

    def get(self, decision_id: int) -> Decision | None:
        r = self._conn().execute(f"SELECT {_COLUMNS} FROM decisions WHERE id = ?", (decision_id,)).fetchone()
        return None if r is None else _row(r)

    def history(self, key: str) -> list[Decision]:
        """Every decision on one image, oldest first."""
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM decisions WHERE image_key = ? ORDER BY id", (key,)
        ).fetchall()
        return [_row(r) for r in rows]

    def since(self, after: int = 0, limit: int = 1000) -> list[Decision]:
        """Decisions with ``id > after``, oldest first, at most ``limit``."""
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM decisions WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        ).fetchall()
        return [_row(r) for r in rows]

    def mask_png(self, decision_id: int) -> bytes:
        r = self._conn().execute("SELECT mask_png FROM decisions WHERE id = ?", (decision_id,)).fetchone()
        if r is None:
            raise KeyError(decision_id)
        return bytes(r[0])

    def count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM decisions").fetchone()[0])
