"""The bot's identity profile (name, author, description) and the history of its changes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    author: str
    description: str = ""


DEFAULT_PROFILE = Profile(name="Selfcog", author="the selfcog team", description="")


class IdentityProfiles:
    """The current profile is the newest row; older rows are its history."""

    def __init__(self, store):
        self.store = store

    def current(self) -> Profile:
        rows = list(self.store.db["identity_profiles"].rows_where(order_by="id desc", limit=1))
        if not rows:
            return DEFAULT_PROFILE
        return Profile(rows[0]["name"], rows[0]["author"], rows[0]["description"] or "")

    def set(self, *, name: str | None = None, author: str | None = None, description: str | None = None,
            changed_by: str = "cli") -> Profile:
        """Change any of the fields; the others keep their current value."""
        from store.db import StoreError, utcnow

        old = self.current()
        new = Profile(
            name=(name if name is not None else old.name).strip(),
            author=(author if author is not None else old.author).strip(),
            description=(description if description is not None else old.description).strip(),
        )
        if not new.name or not new.author:
            raise StoreError("the bot's name and author cannot be empty")
        if len(new.name) > 64 or len(new.author) > 128 or len(new.description) > 1000:
            raise StoreError("name (64), author (128) or description (1000 characters) is too long")
        self.store.db["identity_profiles"].insert(
            {"name": new.name, "author": new.author, "description": new.description,
             "changed_by": changed_by, "created_at": utcnow()}
        )
        return new

    def history(self) -> list[dict]:
        return list(self.store.db["identity_profiles"].rows_where(order_by="id desc"))
