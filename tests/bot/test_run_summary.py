"""bot/run_summary.py: one run row from the real store, as the plain facts every front end formats."""

from __future__ import annotations

import pytest

from bot.run_summary import STAGES, duration, summarize


def test_promoted_run(store):
    run = store.runs.request("web", "admin", claim=True)
    report = {"run_id": run["id"], "status": "promoted", "promoted": True, "adapter": 1, "seconds": 581.4,
              "metrics": {"candidate": {"identity_mean": 0.97}, "base": {"identity_mean": 0.1}}, "reasons": [],
              "phases": {"dataset": 2.5, "training": 420.0, "evaluating": 150.1}}
    store.runs.finish(run["id"], "promoted", report=report, adapter_version=1)
    summary = summarize(store.runs.get(run["id"]))
    assert summary.outcome_line == f"Retrain #{run['id']} promoted: adapter v1 is live."
    assert (summary.finished, summary.ok, summary.percent, summary.adapter_version) == (True, True, 100, 1)
    assert summary.phases == {"dataset": 2.5, "training": 420.0, "evaluating": 150.1}
    assert summary.metrics["candidate"]["identity_mean"] == 0.97 and summary.trigger == "web"
    assert duration(summary.seconds) == "9 min 41 s"


def test_rejected_run_names_the_gates_first_reason_and_what_to_do(store):
    run = store.runs.request("cli", "cli", claim=True)
    reasons = ["identity under product 0.62 < 0.90", "retention 0.41 < 0.50"]
    advice = "Approve more corrections that state the name and maker, then retrain."
    store.runs.finish(run["id"], "rejected", report={"reasons": reasons, "seconds": 30, "advice": advice},
                      error="; ".join(reasons))
    summary = summarize(store.runs.get(run["id"]))
    assert summary.outcome_line == (f"Retrain #{run['id']} rejected: identity under product 0.62 < 0.90 (+1 more). "
                                    + advice)
    assert "\n" not in summary.outcome_line
    assert summary.reasons == reasons and not summary.ok and summary.finished and summary.percent is None


def test_rejected_run_uses_the_gates_own_advice(store):
    run = store.runs.request("cli", "cli", claim=True)
    store.runs.finish(run["id"], "rejected", report={"reasons": ["identity bleed 4 > 1"], "advice": "Do X."})
    assert summarize(store.runs.get(run["id"])).outcome_line.endswith("identity bleed 4 > 1. Do X.")


def test_failed_run_shows_the_last_line_of_its_error(store):
    run = store.runs.request("schedule", "schedule", claim=True)
    store.runs.finish(run["id"], "failed", error="Traceback ...\n  File x\nthe training worker exited with code 9\n")
    summary = summarize(store.runs.get(run["id"]))
    assert summary.outcome_line == (f"Retrain #{run['id']} failed: the training worker exited with code 9. "
                                    "The previous adapter stays live; fix the cause and retrain.")
    assert not summary.ok and summary.error.startswith("Traceback") and summary.seconds is not None


def test_running_run_in_training(store):
    run = store.runs.request("telegram", "telegram:42", claim=True)
    store.runs.progress(run["id"], stage="training", step=12, total_steps=42, loss=1.2345, eta_s=150)
    summary = summarize(store.runs.get(run["id"]))
    assert (summary.stage, summary.stage_label, summary.percent) == ("training", STAGES["training"], 28)
    assert summary.outcome_line == (f"Retrain #{run['id']}: training, step 12/42 (28%), loss 1.234, "
                                    "about 2 min 30 s left.")
    assert summary.ok and not summary.finished


def test_running_run_before_training_has_no_percent(store):
    run = store.runs.request("web", "admin", claim=True)
    store.runs.progress(run["id"], stage="evaluating")
    summary = summarize(store.runs.get(run["id"]))
    assert summary.percent is None and summary.outcome_line == f"Retrain #{run['id']}: evaluating."


def test_queued_run_says_whether_a_runner_will_pick_it_up(store):
    run = store.runs.request("web", "admin")
    assert "starts as soon as" in summarize(run).outcome_line
    assert "start `selfcog serve`" in summarize({**run, "waiting_for_runner": True}).outcome_line


@pytest.mark.parametrize("seconds, text", [(None, "?"), (0.4, "0 s"), (59, "59 s"), (65, "1 min 05 s"),
                                           (3725, "1 h 02 min")])
def test_duration(seconds, text):
    assert duration(seconds) == text
