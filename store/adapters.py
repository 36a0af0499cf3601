"""LoRA adapter versions, which one is live, and the history that rollback walks.

Exactly one row (or none: the base model) has ``active = 1``. Every serving process polls
``active()`` and swaps its weights when the answer changes, so activating here is all it takes
to go live everywhere.
"""

from __future__ import annotations

import json

from store.db import StoreError, utcnow


def _decode(row: dict) -> dict:
    if isinstance(row.get("metrics"), str):
        row["metrics"] = json.loads(row["metrics"])
    return row


class Adapters:
    def __init__(self, store):
        self.store = store

    def register(self, *, path: str, base_model: str, run_id: int | None = None, metrics: dict | None = None) -> int:
        """Record a new adapter folder; returns its version number (1, 2, 3...). Not yet active."""
        with self.store.transaction() as db:
            version = (db.execute("select max(version) from adapters").fetchone()[0] or 0) + 1
            db["adapters"].insert({"version": version, "path": str(path), "base_model": base_model, "run_id": run_id,
                                   "metrics": json.dumps(metrics or {}, ensure_ascii=False), "active": 0,
                                   "created_at": utcnow()})
        return version

    def set_metrics(self, version: int, metrics: dict) -> None:
        self.store.db["adapters"].update(version, {"metrics": json.dumps(metrics, ensure_ascii=False)})

    def get(self, version: int) -> dict:
        rows = list(self.store.db["adapters"].rows_where("version = ?", [version]))
        if not rows:
            raise StoreError(f"adapter v{version} does not exist (selfcog adapters list shows the versions)")
        return _decode(rows[0])

    def list(self, base_model: str | None = None) -> list[dict]:
        where, args = ("base_model = ?", [base_model]) if base_model else (None, [])
        return [_decode(r) for r in self.store.db["adapters"].rows_where(where, args, order_by="version desc")]

    def active(self) -> dict | None:
        """The live adapter ({version, path, ...}) or None for the bare base model. Cheap: engines poll it."""
        rows = list(self.store.db["adapters"].rows_where("active = 1", limit=1))
        return _decode(rows[0]) if rows else None

    def activate(self, version: int | None, by: str | None = None, *, kind: str = "activate") -> dict | None:
        """Make a version live (None = the base model with no adapter) and remember it for rollback."""
        with self.store.transaction() as db:
            if version is not None:
                self.get(version)  # raises for an unknown version before anything changes
            now = utcnow()
            db.execute("update adapters set active = 0 where active = 1")
            if version is not None:
                db["adapters"].update(version, {"active": 1, "activated_at": now})
            db["activations"].insert({"version": version, "kind": kind, "activated_by": by, "at": now})
        return self.get(version) if version is not None else None

    def _stack(self) -> list[int | None]:
        """Replay the activation history: an activation pushes, a rollback pops."""
        stack: list[int | None] = [None]  # the base model is always at the bottom
        for row in self.store.db["activations"].rows_where(order_by="id"):
            if row["kind"] == "rollback":
                if len(stack) > 1:
                    stack.pop()
            else:
                stack.append(row["version"])
        return stack

    def rollback(self, by: str | None = None) -> dict | None:
        """Go back to what was live before the current activation; returns it (None = base model).

        Rolling back twice goes back two activations, like an undo stack."""
        with self.store.transaction():
            stack = self._stack()
            if len(stack) < 2:
                raise StoreError("nothing to roll back to: the base model is live and no earlier adapter was active")
            return self.activate(stack[-2], by=by, kind="rollback")
