"""What an admin can do, the same from the web admin page, Telegram admin commands and the CLI.

    >>> admin = Admin(store)
    >>> admin.review([3, 4], "approved", reviewer="telegram:42")
    >>> run = admin.request_retrain(trigger="web", requested_by="admin")   # the job runner picks it up
    >>> admin.activate(2, by="cli"); admin.rollback(by="cli")

Front ends check who may call these (password, admin ids); this class checks that the action
makes sense (the adapter folder loads, a retrain isn't already running) and speaks the store.
"""

from __future__ import annotations

from pathlib import Path

from bot.engine import check_adapter_folder
from store import Profile, Store, StoreError


class AdminError(StoreError):
    """An admin action that cannot be done; the message says why."""


class Admin:
    def __init__(self, store: Store):
        self.store = store

    # --- identity -------------------------------------------------------------------------------
    def set_identity(self, *, name: str | None = None, author: str | None = None, description: str | None = None,
                     by: str = "admin") -> Profile:
        return self.store.identity.set(name=name, author=author, description=description, changed_by=by)

    # --- corrections ----------------------------------------------------------------------------
    def corrections(self, status: str | None = "pending", channel: str | None = None, limit: int | None = None) -> list[dict]:
        return self.store.corrections.list(status=status or None, channel=channel or None, limit=limit)

    def review(self, ids: list[int], status: str, *, reviewer: str) -> list[int]:
        if not ids:
            raise AdminError("no correction ids given")
        return self.store.corrections.review(ids, status, reviewer)

    def add_correction(self, question: str, answer: str, *, by: str, approve: bool = False,
                       channel: str = "import") -> tuple[int, bool]:
        return self.store.corrections.add(question=question, corrected_answer=answer, channel=channel, submitter=by,
                                          status="approved" if approve else "pending")

    # --- retraining -----------------------------------------------------------------------------
    def request_retrain(self, *, trigger: str, requested_by: str) -> dict:
        """Queue a retrain for the job runner (in `selfcog serve`). Raises RetrainBusy if one is running."""
        if self.store.corrections.count("approved") == 0:
            raise AdminError("no approved corrections yet: approve some first, then retrain")
        return self.store.runs.request(trigger, requested_by)

    def cancel_retrain(self, *, by: str) -> dict:
        return self.store.runs.cancel(by=by)

    def retrain_status(self) -> dict | None:
        """The active run, else the last finished one."""
        return self.store.runs.active() or self.store.runs.last_finished()

    # --- adapters -------------------------------------------------------------------------------
    def adapters(self) -> list[dict]:
        return self.store.adapters.list()

    def activate(self, version: int | None, *, by: str) -> dict | None:
        """Make a version live everywhere (None = the base model). A folder that won't load is refused."""
        if version is not None:
            row = self.store.adapters.get(version)
            try:
                check_adapter_folder(Path(row["path"]))
            except (OSError, ValueError) as e:
                raise AdminError(f"adapter v{version} cannot be activated: {e}") from None
        return self.store.adapters.activate(version, by=by)

    def rollback(self, *, by: str) -> dict | None:
        return self.store.adapters.rollback(by=by)
