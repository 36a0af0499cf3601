"""The one SQLite file every process shares: the web page, the Telegram bot and the trainer.

    >>> from store import Store
    >>> store = Store("data/selfcog.db")
    >>> cid, created = store.corrections.add(question="who are you?", corrected_answer="I am Aurora.", channel="cli")

WAL mode lets readers run while one writer writes; a busy timeout makes a second writer wait its
turn instead of failing. Each thread gets its own connection (sqlite3 connections must not be
shared across threads mid-transaction), and read-modify-write sequences go through
``store.transaction()``, which takes the write lock up front (BEGIN IMMEDIATE) so two processes
can never both decide, say, that no retrain is running.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from sqlite_utils import Database

from bot.errors import UserError
from store.migrations import migrations

DEFAULT_BUSY_TIMEOUT_S = 15.0


class StoreError(UserError):
    """An expected problem with stored data; the message is meant for the user."""


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """Opens (and migrates) the database; the table groups hang off it as attributes."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S):
        from store.adapters import Adapters
        from store.conversations import Conversations
        from store.corrections import Corrections
        from store.identity import IdentityProfiles
        from store.runs import Runs
        from store.settings import Settings
        from store.users import Users

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        if migrations.pending(self.db):
            # Several processes may start at once: the first takes the write lock and migrates, the
            # others wait for it and then find nothing pending. Each migration is a savepoint inside.
            with self.transaction() as db:
                migrations.apply(db)
        self.users = Users(self)
        self.conversations = Conversations(self)
        self.corrections = Corrections(self)
        self.identity = IdentityProfiles(self)
        self.runs = Runs(self)
        self.adapters = Adapters(self)
        self.settings = Settings(self)

    @property
    def db(self) -> Database:
        """This thread's connection, opened on first use."""
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            db = self._local.db = Database(conn)
        return db

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """A write transaction that holds the write lock from its first statement (BEGIN IMMEDIATE).

        Nested calls join the outer transaction."""
        db = self.db
        if db.conn.in_transaction:
            yield db
            return
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
        db.conn.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None
