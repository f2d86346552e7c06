"""``RUN/review.sqlite``: reviewers and their decisions (SQLite, WAL).

Tables
------
``reviewers(name PRIMARY KEY, token_sha256 UNIQUE, created, role, revoked)``
    Tokens are random (192 bits) and shown once; only their SHA-256 is stored (a salt or a slow
    hash buys nothing for random secrets of this length). ``role``: ``reviewer`` (decide, read)
    or ``admin`` (also mint and revoke tokens, export V0); ``revoked``: when the token stopped
    working (NULL while valid). Stores made before roles existed gain both columns on open.
``decisions(id, reviewer, slide_id, cell_id, row, label, unsure, created, kind)``
    Appended, never updated or deleted. ``kind`` is ``decision`` or ``undo`` (an undo appends
    the reviewer's previous label of that cell again, or a NULL label when there was none).
    The latest record per (reviewer, cell) counts; a NULL label means "no decision".

Each server thread keeps its own connection; writes are single ``INSERT`` transactions, so two
reviewers at once never lose a decision (SQLite serialises writers; ``busy_timeout`` waits).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from immunocto.conventions import CLASSES
from immunocto.errors import ImmunoctoError

#: What a reviewer may answer: the five classes, ``not_cell`` (key ``x``) and ``ambiguous``
#: (key ``u``, recorded with ``unsure = 1``).
DECISION_LABELS: tuple[str, ...] = (*CLASSES, "not_cell", "ambiguous")
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
ROLES = ("reviewer", "admin")

SCHEMA = """
CREATE TABLE IF NOT EXISTS reviewers (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    role TEXT NOT NULL DEFAULT 'reviewer',
    revoked REAL
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reviewer TEXT NOT NULL REFERENCES reviewers(name),
    slide_id TEXT NOT NULL,
    cell_id INTEGER NOT NULL,
    row INTEGER NOT NULL,
    label TEXT,
    unsure INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    kind TEXT NOT NULL DEFAULT 'decision'
);
CREATE INDEX IF NOT EXISTS decisions_by_cell ON decisions (reviewer, row, id);
"""


def review_path(run: str | os.PathLike[str]) -> Path:
    return Path(run) / "review.sqlite"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ReviewStore:
    """Access to ``review.sqlite``; cheap to create. Each thread (of each process) keeps one
    connection for its calls: opening one per call was most of a decision's cost under load."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._local = threading.local()
        with self.connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)
            have = {r[1] for r in con.execute("PRAGMA table_info(reviewers)")}
            if "role" not in have:  # a store from before roles: everyone stays a reviewer
                con.execute(
                    "ALTER TABLE reviewers ADD COLUMN role TEXT NOT NULL DEFAULT 'reviewer'"
                )
            if "revoked" not in have:
                con.execute("ALTER TABLE reviewers ADD COLUMN revoked REAL")

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (autocommit: every statement outside an explicit
        transaction commits at once). WAL mode is a property of the file (set once, on open);
        ``synchronous=NORMAL`` is WAL's safe setting: a killed process loses no committed
        decision, only an OS crash may lose the last few. A transaction an exception left
        open is rolled back."""
        local = self._local
        con = getattr(local, "con", None)
        if con is None or local.pid != os.getpid():  # (a forked child opens its own)
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA foreign_keys=ON")
            local.con, local.pid = con, os.getpid()
        try:
            yield con
        finally:
            if con.in_transaction:
                con.rollback()

    # ------------------------------------------------------------------ reviewers
    def add_reviewer(self, name: str, role: str = "reviewer") -> str:
        """Register ``name`` with ``role`` (:data:`ROLES`) and return its token (shown once,
        stored hashed)."""
        if not name or len(name) > 64 or not set(name) <= NAME_CHARS:
            raise ImmunoctoError(f"reviewer name {name!r}: use 1-64 letters, digits, _ . -")
        if role not in ROLES:
            raise ImmunoctoError(f"role {role!r}: choose {' or '.join(ROLES)}")
        token = secrets.token_urlsafe(24)
        with self.connect() as con:
            try:
                con.execute(
                    "INSERT INTO reviewers (name, token_sha256, created, role) VALUES (?, ?, ?, ?)",
                    (name, hash_token(token), time.time(), role),
                )
            except sqlite3.IntegrityError:
                raise ImmunoctoError(
                    f"{self.path}: reviewer {name!r} already exists; choose another name"
                ) from None
        return token

    def revoke(self, name: str) -> None:
        """Stop ``name``'s token from working (its decisions stay)."""
        with self.connect() as con:
            cur = con.execute(
                "UPDATE reviewers SET revoked = ? WHERE name = ? AND revoked IS NULL",
                (time.time(), name),
            )
        if cur.rowcount == 0 and name not in self.reviewers():
            raise ImmunoctoError(f"{self.path}: no reviewer {name!r}")

    def identify(self, token: str | None) -> tuple[str, str] | None:
        """``(name, role)`` of a valid (not revoked) token, or None."""
        if not token:
            return None
        with self.connect() as con:
            row = con.execute(
                "SELECT name, role FROM reviewers WHERE token_sha256 = ? AND revoked IS NULL",
                (hash_token(token),),
            ).fetchone()
        return (row[0], row[1]) if row else None

    def reviewer_for(self, token: str | None) -> str | None:
        """The reviewer whose valid token this is, or None."""
        who = self.identify(token)
        return who[0] if who else None

    def roster(self) -> list[dict]:
        """Every reviewer: name, role, created, revoked (never the token)."""
        with self.connect() as con:
            rows = con.execute(
                "SELECT name, role, created, revoked FROM reviewers ORDER BY name"
            ).fetchall()
        return [{"name": n, "role": r, "created": c, "revoked": v} for n, r, c, v in rows]

    def reviewers(self) -> list[str]:
        with self.connect() as con:
            return [r[0] for r in con.execute("SELECT name FROM reviewers ORDER BY name")]

    # ------------------------------------------------------------------ decisions
    def add_decisions(self, reviewer: str, items: list[dict]) -> int:
        """Append decisions ``{slide_id, cell_id, row, label, unsure}`` in one transaction."""
        now = time.time()
        rows = []
        for it in items:
            label = it["label"]
            if label not in DECISION_LABELS:
                raise ImmunoctoError(
                    f"unknown label {label!r}; allowed: {', '.join(DECISION_LABELS)}"
                )
            rows.append(
                (
                    reviewer,
                    it["slide_id"],
                    int(it["cell_id"]),
                    int(it["row"]),
                    label,
                    int(bool(it.get("unsure"))),
                    now,
                    "decision",
                )
            )
        with self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            con.executemany(
                "INSERT INTO decisions (reviewer, slide_id, cell_id, row, label, unsure, created, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            con.execute("COMMIT")
        return len(rows)

    def undo(self, reviewer: str, row: int) -> str | None:
        """Take back the reviewer's latest decision on crop ``row``; returns the label now in force."""
        with self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            recs = con.execute(
                "SELECT slide_id, cell_id, label, unsure FROM decisions WHERE reviewer = ? AND row = ? ORDER BY id",
                (reviewer, int(row)),
            ).fetchall()
            if not recs:
                con.execute("ROLLBACK")
                return None
            history = self._effective_history(con, reviewer, int(row))
            previous = history[-2] if len(history) >= 2 else (recs[-1][0], recs[-1][1], None, 0)
            con.execute(
                "INSERT INTO decisions (reviewer, slide_id, cell_id, row, label, unsure, created, kind) VALUES (?, ?, ?, ?, ?, ?, ?, 'undo')",
                (
                    reviewer,
                    previous[0],
                    previous[1],
                    int(row),
                    previous[2],
                    previous[3],
                    time.time(),
                ),
            )
            con.execute("COMMIT")
        return previous[2]

    @staticmethod
    def _effective_history(con: sqlite3.Connection, reviewer: str, row: int) -> list[tuple]:
        """The stack of decisions in force after replaying decisions (push) and undos (pop)."""
        stack: list[tuple] = []
        for slide_id, cell_id, label, unsure, kind in con.execute(
            "SELECT slide_id, cell_id, label, unsure, kind FROM decisions WHERE reviewer = ? AND row = ? ORDER BY id",
            (reviewer, row),
        ):
            if kind == "undo":
                if stack:
                    stack.pop()
            else:
                stack.append((slide_id, cell_id, label, unsure))
        return stack

    def all_decisions(self) -> pd.DataFrame:
        """Every record, in order (the audit trail)."""
        with self.connect() as con:
            return pd.read_sql_query("SELECT * FROM decisions ORDER BY id", con)

    def latest(self, reviewer: str | None = None) -> pd.DataFrame:
        """The decision in force per (reviewer, cell): columns reviewer, slide_id, cell_id, row,
        label, unsure, created. Cells whose latest record is a NULL label are left out.
        ``reviewer``: that reviewer's only (an index lookup, not a scan of every decision)."""
        where, args = ("WHERE reviewer = ?", (reviewer,)) if reviewer is not None else ("", ())
        with self.connect() as con:
            df = pd.read_sql_query(
                "SELECT d.reviewer, d.slide_id, d.cell_id, d.row, d.label, d.unsure, d.created FROM decisions d "
                f"JOIN (SELECT reviewer, row, max(id) AS id FROM decisions {where} GROUP BY reviewer, row) m ON d.id = m.id",
                con,
                params=args,
            )
        return df[df["label"].notna()].reset_index(drop=True)

    def reviewed_rows(self, reviewer: str) -> set[int]:
        return set(self.latest(reviewer)["row"].astype(int))
