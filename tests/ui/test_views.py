"""ui/views.py: store rows -> what the pages show. No browser, no model: milliseconds."""

from __future__ import annotations

from ui import views


def run_row(**fields) -> dict:
    return {"id": 4, "status": "running", "stage": "training", "step": 0, "total_steps": None, "loss": None,
            "eta_s": None, "cancel_requested": 0, "adapter_version": None, "error": None, "report": None, **fields}


def test_progress_shows_stage_steps_loss_and_eta_while_training():
    html = views.progress_html(run_row(step=12, total_steps=40, loss=1.23456, eta_s=95))
    assert "Retrain #4" in html and "step 12/40" in html and "loss 1.235" in html and "ETA ≈ 1m 35s" in html
    assert '<progress value="12" max="40"' in html and 'data-status="running"' in html


def test_progress_without_a_step_count_is_indeterminate():
    assert '<progress style="width:100%"></progress>' in views.progress_html(run_row(stage="evaluating"))
    queued = views.progress_html(run_row(status="queued", stage=None))
    assert "waiting for the job runner" in queued and "<progress style" in queued
    assert "No retrain yet" in views.progress_html(None)


def test_progress_and_report_keep_log_text_inert():
    html = views.progress_html(run_row(stage="<script>alert(1)</script>"))
    assert "<script>" not in html and "&lt;script&gt;" in html
    report = views.run_report(run_row(status="failed", error="Traceback...\n<img src=x onerror=alert(1)>"))
    assert "```\nTraceback...\n<img src=x onerror=alert(1)>\n```" in report  # in a code block: shown as text


def test_report_shows_outcome_reasons_dataset_and_table():
    report = views.run_report(run_row(status="rejected", report={
        "seconds": 250.4, "reasons": ["identity under none 0.40 < 0.80"], "table": "identity: product  0.95",
        "dataset": {"rows": 150, "identity_rows": 100, "path": "/x/dataset.jsonl", "sha256": "abc"}}))
    assert "rejected by the gate" in report and "identity under none 0.40 < 0.80" in report
    assert "Took 4m 10s" in report and "rows: 150" in report and "/x/dataset.jsonl" not in report
    assert "identity: product  0.95" in report
    promoted = views.run_report(run_row(status="promoted", adapter_version=3, report={"adapter": 3}))
    assert "Gate passed" in promoted and "adapter v3 is live" in promoted
    assert views.run_report(None) == ""


def test_chat_messages_keep_the_stored_ids_in_order():
    rows = [{"id": 7, "role": "user", "text": "hi"}, {"id": 8, "role": "assistant", "text": "hello"},
            {"id": 9, "role": "system", "text": "(not shown)"}]
    assert views.chat_messages(rows) == ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                                         [7, 8])


def test_tables():
    corrections = views.corrections_frame([{"id": 1, "status": "pending", "channel": "web", "question": "q " * 200,
                                            "wrong_answer": None, "corrected_answer": "a", "submitter": "x" * 32,
                                            "created_at": "2026-11-23T03:00:00.000+00:00"}])
    assert list(corrections.columns)[:3] == ["id", "status", "channel"]
    assert len(corrections.loc[0, "question"]) == 200 and corrections.loc[0, "by"].endswith("…")
    adapters = views.adapters_frame([{"version": 2, "active": 1, "metrics": {"identity_mean": 0.97, "retention": 0.8},
                                      "run_id": 5, "created_at": "c", "activated_at": "a"}])
    assert adapters.loc[0, "live"] == "●" and adapters.loc[0, "version"] == "v2" and adapters.loc[0, "identity"] == 0.97
    losses = views.losses_frame([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    assert losses.to_dict("list") == {"step": [1, 2], "loss": [2.0, 1.5]}
    assert views.correction_choices([{"id": 3, "question": "Who are you?"}]) == [("#3 Who are you?", 3)]
