"""store/: schema, corrections, runs lock, adapters and rollback, several writer processes."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from store import Store, StoreError
from store.migrations import migrations, schema_version
from store.runs import RetrainBusy


def test_fresh_database_is_migrated_and_in_wal_mode(store):
    assert schema_version(store.db) == len(migrations._migrations)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for table in ("users", "conversations", "messages", "feedback", "corrections", "identity_profiles",
                  "training_runs", "run_losses", "adapters", "activations", "settings"):
        assert store.db[table].exists(), table


def test_reopening_does_not_migrate_twice(store):
    store.corrections.add(question="q", corrected_answer="a", channel="cli")
    Store(store.path), Store(store.path)
    assert store.db["_sqlite_migrations"].count == len(migrations._migrations), "each migration recorded once"
    assert not migrations.pending(store.db) and store.corrections.count() == 1


def test_same_correction_twice_is_one_row(store):
    first = store.corrections.add(question="Who are you?", corrected_answer="I am Aurora.", channel="web")
    again = store.corrections.add(question="who are you", corrected_answer="I am Aurora", channel="telegram")
    assert first == (first[0], True) and again == (first[0], False)
    assert store.corrections.count() == 1


def test_correction_needs_question_and_answer(store):
    with pytest.raises(StoreError, match="needs both"):
        store.corrections.add(question="  ", corrected_answer="x", channel="web")


def test_review_with_unknown_id_changes_nothing(store):
    cid, _ = store.corrections.add(question="q", corrected_answer="a", channel="cli")
    with pytest.raises(StoreError, match="no correction with id 99"):
        store.corrections.review([cid, 99], "approved", "admin")
    assert store.corrections.get(cid)["status"] == "pending"
    store.corrections.review([cid], "approved", "admin")
    assert store.corrections.get(cid)["reviewer"] == "admin" and store.corrections.count("approved") == 1


def test_identity_profile_history(store):
    assert store.identity.current().name == "Selfcog"
    store.identity.set(name="Aurora", author="Acme Labs", changed_by="cli")
    store.identity.set(description="Friendly.", changed_by="web")
    profile = store.identity.current()
    assert (profile.name, profile.author, profile.description) == ("Aurora", "Acme Labs", "Friendly.")
    assert [h["changed_by"] for h in store.identity.history()] == ["web", "cli"]
    with pytest.raises(StoreError):
        store.identity.set(name="")


def test_only_one_retrain_at_a_time(store):
    run = store.runs.request("cli", "me", claim=True)
    assert run["status"] == "running"
    with pytest.raises(RetrainBusy, match=f"#{run['id']} is already running"):
        store.runs.request("web", "admin")
    store.runs.finish(run["id"], "failed", error="boom")
    assert store.runs.request("web", "admin")["status"] == "queued"


def test_run_of_a_dead_process_is_marked_failed(store):
    proc = multiprocessing.get_context("spawn").Process(target=_claim_and_die, args=(str(store.path),))
    proc.start()
    proc.join(60)
    run = store.runs.list()[0]
    assert run["status"] == "running"  # nobody has looked yet
    new = store.runs.request("web", "admin")  # looking reaps the dead run first
    assert store.runs.get(run["id"])["status"] == "failed"
    assert "died" in store.runs.get(run["id"])["error"]
    assert new["status"] == "queued"


def _claim_and_die(path):
    Store(path).runs.request("cli", "doomed", claim=True)


def test_progress_builds_the_loss_curve(store):
    run = store.runs.request("cli", "me", claim=True)
    for step, loss in [(1, 2.5), (2, 1.9), (3, 1.1)]:
        store.runs.progress(run["id"], stage="training", step=step, total_steps=3, loss=loss, eta_s=1.0)
    assert [r["loss"] for r in store.runs.losses(run["id"])] == [2.5, 1.9, 1.1]
    assert store.runs.get(run["id"])["step"] == 3


def test_cancel_queued_and_running(store):
    queued = store.runs.request("web", "a")
    assert store.runs.cancel(queued["id"])["status"] == "cancelled"
    running = store.runs.request("cli", "b", claim=True)
    assert store.runs.cancel()["cancel_requested"] == 1 and store.runs.cancel_requested(running["id"])


def test_activation_and_rollback_walk_back_like_undo(store):
    versions = [store.adapters.register(path=f"/a{i}", base_model="m") for i in range(3)]
    assert versions == [1, 2, 3] and store.adapters.active() is None
    for v in versions:
        store.adapters.activate(v, by="test")
    assert store.adapters.active()["version"] == 3
    assert store.adapters.rollback()["version"] == 2
    assert store.adapters.rollback()["version"] == 1
    assert store.adapters.rollback() is None  # back to the base model
    with pytest.raises(StoreError, match="nothing to roll back"):
        store.adapters.rollback()
    with pytest.raises(StoreError, match="v9 does not exist"):
        store.adapters.activate(9)


def test_locked_database_waits_then_fails_clearly(store):
    blocker = sqlite3.connect(store.path)
    blocker.execute("BEGIN IMMEDIATE")
    impatient = Store(store.path, busy_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        impatient.corrections.add(question="q", corrected_answer="a", channel="cli")
    assert time.monotonic() - started >= 0.25  # it waited for the lock before giving up
    blocker.rollback()
    assert impatient.corrections.add(question="q", corrected_answer="a", channel="cli")[1] is True


WRITERS, PER_WRITER, SHARED = 4, 40, 10


def _write_corrections(path, writer):
    store = Store(path)
    for i in range(PER_WRITER):
        store.corrections.add(question=f"q{writer}-{i}", corrected_answer="a", channel="web", submitter=str(writer))
    for i in range(SHARED):  # every writer also submits the same shared fixes: they must stay single rows
        store.corrections.add(question=f"shared {i}", corrected_answer="a", channel="web", submitter=str(writer))


def test_several_processes_writing_at_once_lose_and_duplicate_nothing(store):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_corrections, args=(str(store.path), w)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert store.corrections.count() == WRITERS * PER_WRITER + SHARED
    keys = store.db.execute("select count(distinct dedupe_key) from corrections").fetchone()[0]
    assert keys == WRITERS * PER_WRITER + SHARED


def test_a_live_run_with_an_old_heartbeat_is_not_reaped(store):
    """Evaluation can run for minutes without progress: a live owner on this host keeps its run."""
    run = store.runs.request("cli", "me", claim=True)
    store.runs.update(run["id"], heartbeat_at="2000-01-01T00:00:00.000+00:00")
    assert store.runs.reap_dead() == []
    store.runs.update(run["id"], host="another-host")
    assert store.runs.reap_dead() == [run["id"]], "another host's run with a stale heartbeat is dead"


def test_job_runner_presence(store):
    assert not store.runs.runner_alive()
    store.runs.runner_heartbeat()  # this process: alive
    assert store.runs.runner_alive()
    me = socket.gethostname(), os.getpid()
    store.db["job_runners"].update(me, {"heartbeat_at": "2000-01-01T00:00:00.000+00:00"})
    assert not store.runs.runner_alive(), "a runner that stopped beating is gone"
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    store.runs.runner_heartbeat(finished.pid)
    assert not store.runs.runner_alive(), "a fresh beat from a process on this host that has exited does not count"
    store.runs.runner_heartbeat()
    assert store.db["job_runners"].count == 2, "one row per runner, not one per beat"
