"""People who talk to the bot, per channel (web session, Telegram user id, cli)."""

from __future__ import annotations

from store.db import utcnow


class Users:
    def __init__(self, store):
        self.store = store

    def get_or_create(self, channel: str, external_id: str | int, display_name: str | None = None) -> dict:
        """The user row for (channel, external id), created on first sight."""
        where = ["channel = ? and external_id = ?", [channel, str(external_id)]]
        rows = list(self.store.db["users"].rows_where(*where))
        if rows and (not display_name or display_name == rows[0]["display_name"]):
            return rows[0]  # the common case takes no write lock
        with self.store.transaction() as db:
            rows = list(db["users"].rows_where(*where))
            if rows:
                user = rows[0]
                if display_name and display_name != user["display_name"]:
                    db["users"].update(user["id"], {"display_name": display_name})
                    user["display_name"] = display_name
                return user
            user_id = db["users"].insert(
                {"channel": channel, "external_id": str(external_id), "display_name": display_name,
                 "role": "user", "created_at": utcnow()}
            ).last_pk
            return db["users"].get(user_id)

    def set_role(self, user_id: int, role: str) -> None:
        self.store.db["users"].update(user_id, {"role": role})
