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

    def edit_correction(self, correction_id: int, *, question: str | None = None, answer: str | None = None,
                        by: str) -> dict:
        """Tidy a correction's text before approving it (the status does not change)."""
        return self.store.corrections.edit(correction_id, question=question, corrected_answer=answer, editor=by)

    def correction(self, correction_id: int) -> dict:
        return self.store.corrections.get(correction_id)

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
        """The active run, else the last finished one (a run whose process died shows as failed)."""
        self.store.runs.reap_dead()
        return self.store.runs.active() or self.store.runs.last_finished()

    def recent_run_file(self, key: str) -> tuple[dict, Path] | None:
        """The newest run whose report names a file that is still on disk: key "dataset" (its ms-swift
        JSONL training set) or "candidate" (the adapter it trained, for before/after comparisons)."""
        for run in self.store.runs.list(limit=20):
            report = run.get("report") or {}
            path = (report.get("dataset") or {}).get("path") if key == "dataset" else report.get(f"{key}_path")
            if path and Path(path).exists():
                return run, Path(path)
        return None

    # --- schedule ---------------------------------------------------------------------------------
    SCHEDULE_KEYS = ("retrain_every_hours", "retrain_min_corrections")  # read by finetune.jobs.JobRunner.schedule()

    def schedule(self) -> dict:
        """The retrain schedule set by admins; a None value means the server's setting (env) applies."""
        return {key: self.store.settings.get(key) for key in self.SCHEDULE_KEYS}

    def set_schedule(self, *, every_hours: float, min_corrections: int) -> dict:
        """Retrain every N hours (0 = never on a schedule) once at least M new corrections were approved."""
        if every_hours is None or not 0 <= float(every_hours) <= 24 * 365:
            raise AdminError("the interval is a number of hours from 0 (off) to 8760")
        if min_corrections is None or int(min_corrections) != min_corrections or not 1 <= min_corrections <= 100_000:
            raise AdminError("the minimum of new approved corrections is a whole number, 1 or more")
        self.store.settings.set("retrain_every_hours", float(every_hours))
        self.store.settings.set("retrain_min_corrections", int(min_corrections))
        return self.schedule()

    def run(self, run_id: int) -> dict:
        """One retrain as it is now: status, stage, step/total_steps, loss, eta_s, and at the end its report."""
        return self.store.runs.get(run_id)

    def unannounced_runs(self) -> list[dict]:
        """Finished retrains whose outcome no front end has announced yet."""
        return self.store.runs.unnotified()

    def claim_announcement(self, run_id: int) -> bool:
        """True for the one caller, in any process, that should announce this run's outcome."""
        return self.store.runs.mark_notified(run_id)

    def overview(self) -> dict:
        """Live adapter, corrections waiting and approved, the current or last retrain: an admin's glance."""
        active = self.store.adapters.active()
        return {"adapter": active["version"] if active else None,
                "pending_corrections": self.store.corrections.count("pending"),
                "approved_corrections": self.store.corrections.count("approved"),
                "retrain": self.retrain_status()}

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
