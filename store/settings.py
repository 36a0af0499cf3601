"""Small key/value settings an admin changes at run time (the retrain schedule), as JSON."""

from __future__ import annotations

import json
from typing import Any

from store.db import utcnow


class Settings:
    def __init__(self, store):
        self.store = store

    def get(self, key: str, default: Any = None) -> Any:
        rows = list(self.store.db["settings"].rows_where("key = ?", [key]))
        return json.loads(rows[0]["value"]) if rows else default

    def set(self, key: str, value: Any) -> None:
        self.store.db["settings"].upsert({"key": key, "value": json.dumps(value), "updated_at": utcnow()}, pk="key")
