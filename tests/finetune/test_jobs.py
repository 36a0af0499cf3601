"""finetune/jobs.py without training: the schedule's decisions and the runner's bookkeeping."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from finetune.jobs import JobRunner, JobSettings


def runner(store, tmp_path, **settings) -> JobRunner:
    return JobRunner(JobSettings(data_dir=tmp_path, cache_dir=tmp_path, **settings), store, model=None, engine=None)


def approve(store, n: int) -> None:
    for i in range(n):
        store.corrections.add(question=f"q{i}", corrected_answer=f"a{i}", channel="web", status="approved")


def test_schedule_is_off_by_default(store, tmp_path):
    approve(store, 10)
    assert runner(store, tmp_path).request_if_due() is None
    assert store.runs.list() == []


def test_schedule_waits_for_enough_new_corrections(store, tmp_path):
    jobs = runner(store, tmp_path, retrain_every_hours=1, retrain_min_corrections=3)
    approve(store, 2)
    assert jobs.request_if_due() is None
    approve(store, 3)
    run = jobs.request_if_due()
    assert run["status"] == "queued" and run["trigger"] == "schedule"
    assert jobs.request_if_due() is None, "one is already queued"


def test_schedule_waits_for_the_interval(store, tmp_path):
    jobs = runner(store, tmp_path, retrain_every_hours=24, retrain_min_corrections=1)
    approve(store, 1)
    first = jobs.request_if_due()
    store.runs.finish(first["id"], "promoted")
    store.corrections.add(question="new", corrected_answer="one", channel="web", status="approved")
    assert jobs.request_if_due() is None, "the last retrain was just now"
    long_ago = (datetime.now(timezone.utc) - timedelta(hours=25)).isoformat(timespec="milliseconds")
    store.runs.update(first["id"], created_at=long_ago, started_at=long_ago)
    assert jobs.request_if_due()["trigger"] == "schedule"


def test_admin_page_settings_override_the_environment(store, tmp_path):
    jobs = runner(store, tmp_path, retrain_every_hours=0, retrain_min_corrections=5)
    assert jobs.schedule() == (0.0, 5)
    store.settings.set("retrain_every_hours", 6)
    store.settings.set("retrain_min_corrections", 2)
    assert jobs.schedule() == (6.0, 2)


def test_cached_base_answers_are_kept_apart_by_precision(tmp_path):
    """bf16 and fp32 weights answer differently in places: one precision's cached answers never stand in
    for the other's (the CPU engine picks bf16 where the CPU has bf16 instructions)."""
    from bot.models import ResolvedModel
    from finetune.jobs import general_answers

    class Engine:
        def __init__(self, precision):
            self.precision, self.calls = precision, 0

        def generate(self, conversations, **_):
            self.calls += 1
            return [f"{self.precision} answer"] * len(conversations)

    model = ResolvedModel(str(tmp_path), "tiny", "llama", "chatml")
    bf16, fp32 = Engine("bf16"), Engine("fp32")
    assert {a["answer"] for a in general_answers(bf16, model, tmp_path)} == {"bf16 answer"}
    assert {a["answer"] for a in general_answers(fp32, model, tmp_path)} == {"fp32 answer"}
    assert {a["answer"] for a in general_answers(Engine("bf16"), model, tmp_path)} == {"bf16 answer"}
    assert (bf16.calls, fp32.calls) == (1, 1) and len(list((tmp_path / "general").glob("*.json"))) == 2
