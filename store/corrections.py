"""Corrections: a question, the answer the bot gave, and the answer it should have given.

A correction starts ``pending``; an admin approves or rejects it. Only approved corrections reach
training. The same fix submitted twice (a double click, a re-import) is one row: the dedupe key is
the normalized question and answer, enforced by a unique index so concurrent writers agree.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3

from store.db import StoreError, utcnow

STATUSES = ("pending", "approved", "rejected")
MAX_TEXT = 4000  # characters; a correction is a sentence or two, not an essay


def dedupe_key(question: str, answer: str) -> str:
    def norm(text: str) -> str:
        return re.sub(r"[\W_]+", " ", text.lower()).strip()

    return hashlib.sha1(f"{norm(question)}\x00{norm(answer)}".encode()).hexdigest()


class Corrections:
    def __init__(self, store):
        self.store = store

    def add(self, *, question: str, corrected_answer: str, channel: str, wrong_answer: str | None = None,
            submitter: str | None = None, message_id: int | None = None, status: str = "pending") -> tuple[int, bool]:
        """Store a correction; returns (id, created). created is False when the same fix already exists."""
        question, corrected_answer = (question or "").strip(), (corrected_answer or "").strip()
        if not question or not corrected_answer:
            raise StoreError("a correction needs both the question and the corrected answer")
        if len(question) > MAX_TEXT or len(corrected_answer) > MAX_TEXT:
            raise StoreError(f"a correction is limited to {MAX_TEXT} characters per field")
        if status not in STATUSES:
            raise StoreError(f"status must be one of {', '.join(STATUSES)}")
        key = dedupe_key(question, corrected_answer)
        now = utcnow()
        row = {"message_id": message_id, "question": question, "wrong_answer": wrong_answer,
               "corrected_answer": corrected_answer, "submitter": submitter, "channel": channel,
               "status": status, "created_at": now, "dedupe_key": key}
        if status != "pending":
            row.update(reviewer=submitter, reviewed_at=now)
        with self.store.transaction() as db:
            try:
                return db["corrections"].insert(row).last_pk, True
            except sqlite3.IntegrityError:
                existing = list(db["corrections"].rows_where("dedupe_key = ?", [key]))[0]
                return existing["id"], False

    def get(self, correction_id: int) -> dict:
        rows = list(self.store.db["corrections"].rows_where("id = ?", [correction_id]))
        if not rows:
            raise StoreError(f"correction {correction_id} does not exist")
        return rows[0]

    def list(self, *, status: str | None = None, channel: str | None = None, limit: int | None = None,
             offset: int = 0) -> list[dict]:
        where, args = [], []
        if status:
            where.append("status = ?")
            args.append(status)
        if channel:
            where.append("channel = ?")
            args.append(channel)
        return list(self.store.db["corrections"].rows_where(
            " and ".join(where) or None, args, order_by="id", limit=limit, offset=offset or None))

    def count(self, status: str | None = None) -> int:
        if status:
            return self.store.db.execute("select count(*) from corrections where status = ?", [status]).fetchone()[0]
        return self.store.db["corrections"].count

    def review(self, ids: list[int], status: str, reviewer: str) -> list[int]:
        """Approve or reject; returns the ids that exist (unknown ids raise before anything changes)."""
        if status not in ("approved", "rejected", "pending"):
            raise StoreError("review status must be approved, rejected or pending")
        with self.store.transaction() as db:
            found = {r["id"] for r in db.query(
                f"select id from corrections where id in ({','.join('?' * len(ids))})", list(ids))} if ids else set()
            missing = sorted(set(ids) - found)
            if missing:
                raise StoreError(f"no correction with id {', '.join(map(str, missing))}")
            now = utcnow()
            for correction_id in ids:
                db["corrections"].update(correction_id, {"status": status, "reviewer": reviewer, "reviewed_at": now})
        return list(ids)

    def edit(self, correction_id: int, *, question: str | None = None, corrected_answer: str | None = None,
             editor: str | None = None) -> dict:
        """Change the text of a correction (an admin tidying a user's fix before approving it)."""
        current = self.get(correction_id)
        question = (question if question is not None else current["question"]).strip()
        corrected_answer = (corrected_answer if corrected_answer is not None else current["corrected_answer"]).strip()
        if not question or not corrected_answer:
            raise StoreError("a correction needs both the question and the corrected answer")
        try:
            self.store.db["corrections"].update(correction_id, {
                "question": question, "corrected_answer": corrected_answer,
                "dedupe_key": dedupe_key(question, corrected_answer), "reviewer": editor})
        except sqlite3.IntegrityError:
            raise StoreError("another correction already says exactly this") from None
        return self.get(correction_id)

    def approved(self) -> list[dict]:
        return self.list(status="approved")

    def approved_since(self, since: str | None) -> int:
        """How many corrections were approved after a moment (the schedule's 'enough new data' check)."""
        if since is None:
            return self.count("approved")
        return self.store.db.execute(
            "select count(*) from corrections where status = 'approved' and reviewed_at > ?", [since]).fetchone()[0]
