"""Training runs: the request, the one-at-a-time lock, live progress, and the outcome.

Every front end asks for a retrain the same way, ``runs.request(...)``, and reads progress from
here; the job runner in finetune/ claims requests one at a time. A run that is ``running`` names
the process that owns it (pid + host) and keeps a heartbeat, so when that process dies (killed,
OOM, power cut) the next look at the table marks the run failed instead of leaving it "running"
forever and blocking every later retrain.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timedelta, timezone

from store.db import StoreError, utcnow

ACTIVE = ("queued", "running")
FINISHED = ("promoted", "rejected", "failed", "cancelled", "skipped")
STALE_AFTER = timedelta(minutes=10)  # a run owned by another host with no heartbeat for this long is dead
RUNNER_FORGOTTEN_AFTER = timedelta(days=1)  # job runner rows older than this are deleted at the next beat


class RetrainBusy(StoreError):
    """A retrain is already queued or running; ``.run`` is that run."""

    def __init__(self, run: dict):
        self.run = run
        super().__init__(f"retrain #{run['id']} is already {run['status']}"
                         + (f" ({run['stage']}, step {run['step']}/{run['total_steps']})" if run.get("stage") else "")
                         + ": wait for it to finish or cancel it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ago(delta: timedelta) -> str:
    return (datetime.now(timezone.utc) - delta).isoformat(timespec="milliseconds")


def _decode(run: dict | None) -> dict | None:
    if run is not None:
        for key in ("recipe", "metrics", "report"):
            if isinstance(run.get(key), str):
                run[key] = json.loads(run[key])
    return run


class Runs:
    def __init__(self, store):
        self.store = store

    # --- asking for a retrain -------------------------------------------------------------------
    def request(self, trigger: str, requested_by: str | None = None, *, claim: bool = False) -> dict:
        """Queue a retrain, or raise RetrainBusy when one is queued or running.

        claim=True also marks it running for this process (the CLI runs its retrain itself)."""
        with self.store.transaction() as db:
            self._reap_dead(db)
            busy = self.active()
            if busy:
                raise RetrainBusy(busy)
            now = utcnow()
            row = {"status": "queued", "trigger": trigger, "requested_by": requested_by, "created_at": now}
            if claim:
                row.update(self._owner(now), status="running", started_at=now)
            run_id = db["training_runs"].insert(row).last_pk
        return self.get(run_id)

    def claim_next(self) -> dict | None:
        """Take the oldest queued run for this process (the job runner's loop)."""
        with self.store.transaction() as db:
            self._reap_dead(db)
            rows = list(db["training_runs"].rows_where("status = 'queued'", order_by="id", limit=1))
            if not rows:
                return None
            now = utcnow()
            db["training_runs"].update(rows[0]["id"], {**self._owner(now), "status": "running", "started_at": now})
        return self.get(rows[0]["id"])

    @staticmethod
    def _owner(now: str) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "heartbeat_at": now}

    # --- while it runs ----------------------------------------------------------------------------
    def progress(self, run_id: int, *, stage: str | None = None, step: int | None = None,
                 total_steps: int | None = None, loss: float | None = None, eta_s: float | None = None) -> None:
        """Record progress (and a heartbeat); a loss at a step also joins the run's loss curve."""
        now = utcnow()
        update = {"heartbeat_at": now}
        for key, value in (("stage", stage), ("step", step), ("total_steps", total_steps), ("loss", loss), ("eta_s", eta_s)):
            if value is not None:
                update[key] = value
        with self.store.transaction() as db:
            db["training_runs"].update(run_id, update)
            if loss is not None and step is not None:
                db["run_losses"].upsert({"run_id": run_id, "step": step, "loss": loss, "at": now}, pk=("run_id", "step"))

    def heartbeat(self, run_id: int) -> None:
        self.store.db["training_runs"].update(run_id, {"heartbeat_at": utcnow()})

    def update(self, run_id: int, **fields) -> None:
        """Store facts learnt on the way (recipe, dataset hash and rows...). Dicts are kept as JSON."""
        fields = {k: json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v for k, v in fields.items()}
        self.store.db["training_runs"].update(run_id, fields)

    def finish(self, run_id: int, status: str, **fields) -> dict:
        if status not in FINISHED:
            raise ValueError(f"unknown final status {status!r}")
        self.update(run_id, status=status, finished_at=utcnow(), **fields)
        return self.get(run_id)

    def append_log(self, run_id: int, text: str) -> None:
        self.store.db.execute("update training_runs set log = coalesce(log, '') || ? where id = ?", [text, run_id])

    # --- cancelling -------------------------------------------------------------------------------
    def cancel(self, run_id: int | None = None, by: str | None = None) -> dict:
        """Cancel the given (or the active) run: a queued one at once, a running one at its next check."""
        with self.store.transaction() as db:
            run = self.get(run_id) if run_id else self.active()
            if run is None or run["status"] not in ACTIVE:
                raise StoreError("no retrain is queued or running" if run is None
                                 else f"retrain #{run['id']} already ended ({run['status']})")
            if run["status"] == "queued":
                db["training_runs"].update(run["id"], {"status": "cancelled", "finished_at": utcnow(),
                                                       "error": f"cancelled by {by or 'an admin'} before it started"})
            else:
                db["training_runs"].update(run["id"], {"cancel_requested": 1})
        return self.get(run["id"])

    def cancel_requested(self, run_id: int) -> bool:
        return bool(self.store.db.execute("select cancel_requested from training_runs where id = ?", [run_id]).fetchone()[0])

    # --- reading ----------------------------------------------------------------------------------
    def get(self, run_id: int) -> dict:
        rows = list(self.store.db["training_runs"].rows_where("id = ?", [run_id]))
        if not rows:
            raise StoreError(f"training run {run_id} does not exist")
        return _decode(rows[0])

    def active(self) -> dict | None:
        rows = list(self.store.db["training_runs"].rows_where(
            f"status in {ACTIVE}", order_by="id", limit=1))
        return _decode(rows[0]) if rows else None

    def list(self, limit: int = 20) -> list[dict]:
        return [_decode(r) for r in self.store.db["training_runs"].rows_where(order_by="id desc", limit=limit)]

    def losses(self, run_id: int) -> list[dict]:
        return list(self.store.db["run_losses"].rows_where("run_id = ?", [run_id], order_by="step"))

    def last_finished(self, statuses: tuple[str, ...] = FINISHED) -> dict | None:
        rows = list(self.store.db["training_runs"].rows_where(
            f"status in ({','.join('?' * len(statuses))})", list(statuses), order_by="id desc", limit=1))
        return _decode(rows[0]) if rows else None

    def unnotified(self, within_hours: float = 24) -> list[dict]:
        """Finished runs no front end has announced yet (scheduled retrains tell admins the outcome).

        Only recent ones: a bot started after a week offline should not announce last week's runs."""
        since = (datetime.now(timezone.utc) - timedelta(hours=within_hours)).isoformat()
        return [_decode(r) for r in self.store.db["training_runs"].rows_where(
            f"notified = 0 and status in {FINISHED} and finished_at >= ?", [since], order_by="id")]

    def mark_notified(self, run_id: int) -> bool:
        """True for the one caller that flips it, so an outcome is announced once."""
        cur = self.store.db.execute("update training_runs set notified = 1 where id = ? and notified = 0", [run_id])
        return cur.rowcount == 1

    # --- the job runner ---------------------------------------------------------------------------
    def runner_heartbeat(self, pid: int | None = None) -> None:
        """A job runner says it is alive (it calls this on every poll)."""
        with self.store.transaction() as db:
            db["job_runners"].upsert({"host": socket.gethostname(), "pid": pid or os.getpid(),
                                      "heartbeat_at": utcnow()}, pk=("host", "pid"))
            db.execute("delete from job_runners where heartbeat_at < ?", [_ago(RUNNER_FORGOTTEN_AFTER)])

    def runner_alive(self, max_age_s: float = 30) -> bool:
        """Whether some job runner beat in the last max_age_s seconds (on this host: and its process lives)."""
        host = socket.gethostname()
        recent = self.store.db["job_runners"].rows_where("heartbeat_at >= ?", [_ago(timedelta(seconds=max_age_s))])
        return any(r["host"] != host or _pid_alive(r["pid"]) for r in recent)

    # --- crash recovery ---------------------------------------------------------------------------
    def reap_dead(self) -> list[int]:
        with self.store.transaction() as db:
            return self._reap_dead(db)

    @staticmethod
    def owner_dead(run: dict) -> bool:
        """A running run whose owner died: a dead pid on this host, or, for a run owned by another
        host (a shared disk), a heartbeat older than STALE_AFTER. Reads nothing."""
        if run["status"] != "running":
            return False
        if run["host"] == socket.gethostname():
            return not run["pid"] or not _pid_alive(run["pid"])
        return (run["heartbeat_at"] or run["created_at"]) < _ago(STALE_AFTER)

    def _reap_dead(self, db) -> list[int]:
        """Mark failed every running run whose owner died (owner_dead)."""
        reaped = []
        for run in db["training_runs"].rows_where("status = 'running'"):
            if self.owner_dead(run):
                db["training_runs"].update(run["id"], {
                    "status": "failed", "finished_at": utcnow(),
                    "error": "the process running this retrain died (killed or crashed); the previous adapter stayed active"})
                reaped.append(run["id"])
        return reaped
