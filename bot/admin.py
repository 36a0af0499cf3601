"""What an admin can do, the same from the web admin page, Telegram admin commands and the CLI.

    >>> admin = Admin(store, engine=engine, model=model)
    >>> admin.review([3, 4], "approved", reviewer="telegram:42")
    >>> run = admin.request_retrain("admin", "web")      # the job runner picks it up
    >>> admin.current_run().outcome_line                  # a RunSummary: every front end formats the same facts
    >>> admin.activate(2, by="cli"); admin.rollback(by="cli")

Front ends read through this class only, and check who may call it (password, admin ids); this
class checks that the action makes sense (the adapter folder fits the model, there is something to
train) and speaks the store. Every refusal is a UserError whose message is one line for the admin.
"""

from __future__ import annotations

from pathlib import Path

from bot.chat import clean_text
from bot.engines import check_adapter_folder
from bot.errors import UserError
from bot.identity import system_prompt
from bot.run_summary import RunSummary, summarize
from store import Profile, Store
from store.corrections import MAX_TEXT


class AdminError(UserError):
    """An admin action that cannot be done; the message says why."""


class Admin:
    def __init__(self, store: Store, *, engine=None, model=None):
        """engine: this process's engine, swapped at once on activation; model: its ResolvedModel,
        which an adapter folder must fit before it can go live."""
        self.store = store
        self.engine = engine
        self.model = model

    # --- identity -------------------------------------------------------------------------------
    def profile(self) -> Profile:
        return self.store.identity.current()

    def identity(self) -> dict:
        """The profile, the system prompt chat runs under, and the history of changes (newest first)."""
        profile = self.profile()
        return {"name": profile.name, "author": profile.author, "description": profile.description,
                "system_prompt": system_prompt(profile), "history": self.store.identity.history()}

    def set_identity(self, *, name: str | None = None, author: str | None = None, description: str | None = None,
                     by: str = "admin") -> Profile:
        """Change any of name, author, description (None keeps it); the text is cleaned like chat input."""
        def clean(value, what, limit):
            return None if value is None else clean_text(value, what=what, limit=limit)

        return self.store.identity.set(name=clean(name, "name", 64), author=clean(author, "author", 128),
                                       description=None if description is None
                                       else clean_text(description, what="description", limit=1000, empty_ok=True),
                                       changed_by=by)

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
        question = None if question is None else clean_text(question, what="question", limit=MAX_TEXT)
        answer = None if answer is None else clean_text(answer, what="answer", limit=MAX_TEXT)
        return self.store.corrections.edit(correction_id, question=question, corrected_answer=answer, editor=by)

    def correction(self, correction_id: int) -> dict:
        return self.store.corrections.get(correction_id)

    def add_correction(self, question: str, answer: str, *, by: str, approve: bool = False,
                       channel: str = "import") -> tuple[int, bool]:
        return self.store.corrections.add(
            question=clean_text(question, what="question", limit=MAX_TEXT),
            corrected_answer=clean_text(answer, what="answer", limit=MAX_TEXT), channel=channel, submitter=by,
            status="approved" if approve else "pending")

    def import_corrections(self, pairs, *, by: str, approve: bool = False, source: str = "the file") -> dict:
        """Add (question, answer, line) pairs all together or not at all; a bad one is named by its line.

        Returns {"read", "added", "duplicates", "ids", "status"}."""
        results = []
        with self.store.transaction():
            for question, answer, line in pairs:
                try:
                    results.append(self.add_correction(question, answer, by=by, approve=approve))
                except UserError as e:
                    raise AdminError(f"{source} line {line}: {e} (nothing was imported)") from None
        return {"read": len(results), "added": sum(created for _, created in results),
                "duplicates": sum(not created for _, created in results), "ids": [i for i, _ in results],
                "status": "approved" if approve else "pending"}

    # --- retraining -----------------------------------------------------------------------------
    def request_retrain(self, by: str, channel: str, *, claim: bool = False, trained: bool = False) -> dict:
        """Queue a retrain for the job runner; returns its row, with "waiting_for_runner" True when no
        job runner is alive to pick it up. Refused when nothing is approved or a retrain is active.

        claim: this process runs it itself (the CLI's `selfcog retrain`), so no runner is needed.
        trained: an adapter trained elsewhere will be gated, so no corrections are needed."""
        if not trained and self.store.corrections.count("approved") == 0:
            raise AdminError("no approved corrections: approve some first")
        run = self.store.runs.request(channel, by, claim=claim)
        return {**run, "waiting_for_runner": not claim and not self.store.runs.runner_alive()}

    def cancel_retrain(self, *, by: str) -> dict:
        return self.store.runs.cancel(by=by)

    def current_run(self) -> RunSummary | None:
        """The active retrain, else the last finished one. A run whose process died is marked failed
        here (the only write, and only then); a queued one says whether a job runner will pick it up."""
        run = self.store.runs.active() or self.store.runs.last_finished()
        if run is None:
            return None
        if self.store.runs.owner_dead(run):
            self.store.runs.reap_dead()
            run = self.store.runs.get(run["id"])
        if run["status"] == "queued":
            run["waiting_for_runner"] = not self.store.runs.runner_alive()
        return summarize(run)

    def run(self, run_id: int) -> RunSummary:
        """One retrain as it is now: stage, step/total_steps, loss, eta_s, and at the end its outcome."""
        return summarize(self.store.runs.get(run_id))

    def runs(self, limit: int = 20) -> list[RunSummary]:
        """The newest retrains first."""
        return [summarize(run) for run in self.store.runs.list(limit=limit)]

    def losses(self, run_id: int) -> list[dict]:
        """The run's loss curve: [{"step", "loss"}, ...] by step."""
        return [{"step": r["step"], "loss": r["loss"]} for r in self.store.runs.losses(run_id)]

    def recent_run_file(self, key: str) -> tuple[dict, Path] | None:
        """The newest run whose report names a file that is still on disk: key "dataset" (its ms-swift
        JSONL training set) or "candidate" (the adapter it trained, for before/after comparisons)."""
        for run in self.store.runs.list(limit=20):
            report = run.get("report") or {}
            path = (report.get("dataset") or {}).get("path") if key == "dataset" else report.get(f"{key}_path")
            if path and Path(path).exists():
                return run, Path(path)
        return None

    def unannounced_runs(self) -> list[RunSummary]:
        """Finished retrains whose outcome no front end has announced yet."""
        return [summarize(run) for run in self.store.runs.unnotified()]

    def claim_announcement(self, run_id: int) -> bool:
        """True for the one caller, in any process, that should announce this run's outcome."""
        return self.store.runs.mark_notified(run_id)

    def overview(self) -> dict:
        """An admin's glance: identity, live adapter, corrections waiting and approved, the current or
        last retrain (a RunSummary) and whether a job runner is alive to train."""
        profile = self.profile()
        active = self.store.adapters.active()
        return {"name": profile.name, "author": profile.author, "description": profile.description,
                "adapter": active["version"] if active else None,
                "adapters": len(self.store.adapters.list()),
                "pending_corrections": self.store.corrections.count("pending"),
                "approved_corrections": self.store.corrections.count("approved"),
                "retrain": self.current_run(), "runner_alive": self.store.runs.runner_alive()}

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

    # --- adapters -------------------------------------------------------------------------------
    def adapters(self) -> list[dict]:
        return self.store.adapters.list()

    def activate(self, version: int | None, *, by: str) -> dict | None:
        """Make a version live everywhere (None = the base model). A folder that is not a LoRA for
        this model is refused; this process's engine swaps at once, the others at their next poll."""
        if version is not None:
            row = self.store.adapters.get(version)
            try:
                check_adapter_folder(Path(row["path"]), self.model)
            except UserError as e:
                raise AdminError(f"adapter v{version} cannot be activated: {e}") from None
        row = self.store.adapters.activate(version, by=by)
        self._swap_now()
        return row

    def rollback(self, *, by: str) -> dict | None:
        row = self.store.adapters.rollback(by=by)
        self._swap_now()
        return row

    def _swap_now(self) -> None:
        if self.engine is not None:
            self.engine.refresh_adapter()
