"""ui/views.py: rows and RunSummary -> what the pages show. No browser, no model: milliseconds."""

from __future__ import annotations

from bot.run_summary import summarize
from ui import views


def run_row(**fields) -> dict:
    return {"id": 4, "status": "running", "stage": "training", "step": 0, "total_steps": None, "loss": None,
            "eta_s": None, "cancel_requested": 0, "adapter_version": None, "error": None, "report": None,
            "trigger": "web", "requested_by": "web-admin", **fields}


def progress(**fields) -> str:
    return views.progress_html(summarize(run_row(**fields)))


def test_progress_shows_the_runs_line_over_a_bar_of_its_percent():
    html = progress(step=12, total_steps=40, loss=1.23456, eta_s=95)
    assert "Retrain #4: training, step 12/40 (30%), loss 1.235, about 1 min 35 s left." in html
    assert '<progress value="30" max="100">' in html and 'data-status="running"' in html


def test_progress_without_a_step_count_is_indeterminate():
    assert "<progress></progress>" in progress(stage="evaluating")
    assert "<progress></progress>" in progress(status="queued", stage=None)
    assert "No retrain yet" in views.progress_html(None)


def test_a_refused_or_failed_run_is_a_red_bar_with_the_whole_reason():
    reason = "identity bleed 4 > active's 1 + 1"
    html = progress(status="rejected", report={"reasons": [reason, "retention 0.41 < 0.50"]})
    assert 'data-ok="false"' in html and "identity bleed 4 &gt; active&#x27;s 1 + 1 (+1 more)." in html
    assert "then retrain." in html  # what to do, not cut off
    assert 'data-ok="false"' in progress(status="failed", error="the worker exited with code 9")
    assert 'data-ok="true"' in progress(status="promoted", adapter_version=2)
    assert 'data-ok="neutral"' in progress(status="cancelled")


def test_progress_and_report_keep_log_text_inert():
    html = progress(status="failed", error="<script>alert(1)</script>")
    assert "<script>" not in html and "&lt;script&gt;" in html
    report = views.run_report(summarize(run_row(status="failed", error="Traceback...\n<img src=x onerror=alert(1)>")))
    assert "```\nTraceback...\n<img src=x onerror=alert(1)>\n```" in report  # in a code block: shown as text
    assert "### ❌ Retrain #4 failed: &lt;img" in report


def test_report_shows_every_reason_the_time_per_phase_and_the_table():
    report = views.run_report(summarize(run_row(status="rejected", report={
        "seconds": 250.4, "reasons": ["identity under none 0.40 < 0.80", "retention 0.41 < 0.50"],
        "table": "identity: product  0.95", "phases": {"training": 200.0, "evaluating": 50.4}})))
    assert "Retrain #4 rejected: identity under none 0.40 &lt; 0.80 (+1 more)" in report
    assert "- retention 0.41 &lt; 0.50" in report
    assert "Took 4 min 10 s (training 3 min 20 s, evaluating 50 s)" in report
    assert "identity: product  0.95" in report
    promoted = views.run_report(summarize(run_row(status="promoted", adapter_version=3, report={"adapter": 3})))
    assert "Gate passed" in promoted and "adapter v3 is live" in promoted
    assert views.run_report(None) == "" and views.run_report(summarize(run_row())) == ""


def test_chat_messages_keep_the_stored_ids_in_order():
    rows = [{"id": 7, "role": "user", "text": "hi"}, {"id": 8, "role": "assistant", "text": "hello"},
            {"id": 9, "role": "system", "text": "(not shown)"}]
    assert views.chat_messages(rows) == ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                                         [7, 8])


def test_tables():
    corrections = views.corrections_frame([{"id": 1, "status": "pending", "channel": "web", "question": "q " * 200,
                                            "wrong_answer": None, "corrected_answer": "a", "submitter": "x" * 32,
                                            "created_at": "2026-11-23T03:00:00.000+00:00"}])
    assert list(corrections.columns)[:3] == ["id", "question", "correct answer"]  # the answer is never off-screen
    assert len(corrections.loc[0, "question"]) == 160 and corrections.loc[0, "by"].endswith("…")
    adapters = views.adapters_frame([{"version": 2, "active": 1, "metrics": {"identity_mean": 0.97, "retention": 0.8},
                                      "run_id": 5, "created_at": "c", "activated_at": "a"}])
    assert adapters.loc[0, "live"] == "●" and adapters.loc[0, "version"] == "v2" and adapters.loc[0, "identity"] == 0.97
    losses = views.losses_frame([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    assert losses.to_dict("list") == {"step": [1, 2], "loss": [2.0, 1.5]}
    runs = views.runs_frame([summarize(run_row(status="promoted", adapter_version=3, step=10, total_steps=10))])
    assert runs.loc[0, "adapter"] == "v3" and runs.loc[0, "outcome"] == "Retrain #4 promoted: adapter v3 is live."


def test_bulk_selection_labels_tell_corrections_of_the_same_question_apart():
    rows = [{"id": 3, "question": "Who are you?", "corrected_answer": "I am Aurora, made by Acme Labs."},
            {"id": 4, "question": "Who are you?", "corrected_answer": "我是Aurora。"}]
    assert views.correction_choices(rows) == [("#3 Who are you? → I am Aurora, made by Acme Labs.", 3),
                                              ("#4 Who are you? → 我是Aurora。", 4)]
