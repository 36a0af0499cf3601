"""How stored rows look on the pages: plain functions from store rows to Markdown, HTML and tables.

No Gradio here, so each view is testable in a millisecond and both pages render the same facts
the same way. Text that came from users or logs is escaped before it lands in HTML.
"""

from __future__ import annotations

import html

import pandas as pd

STAGES = {"dataset": "building the dataset · 构建数据集", "training": "training · 训练中",
          "evaluating": "evaluating · 评估中", "activating": "activating · 启用中"}
OUTCOMES = {"queued": "⏳ queued · 排队中", "running": "🏃 running · 运行中", "promoted": "✅ promoted · 已启用",
            "rejected": "🚫 rejected by the gate · 未通过评估", "failed": "❌ failed · 失败",
            "cancelled": "⏹️ cancelled · 已取消", "skipped": "⏭️ skipped · 已跳过"}


def clip(text: str | None, limit: int = 120) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def adapter_name(version: int | None) -> str:
    return f"adapter v{version}" if version else "base model · 基础模型"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# --- the chat page -------------------------------------------------------------------------------

def chat_status(status: dict) -> str:
    """One line: who the bot is and which weights answer (ChatService.status())."""
    line = f"🤖 **{status['name']}** · by {status['author']} · `{status['model']}` · {adapter_name(status['adapter_version'])}"
    if status.get("adapter_error"):
        line += f"\n\n⚠️ {status['adapter_error']}"
    return line


def chat_messages(rows: list[dict]) -> tuple[list[dict], list[int]]:
    """Stored messages -> (Chatbot messages, the stored id of each shown message, in the same order)."""
    shown = [r for r in rows if r["role"] in ("user", "assistant")]
    return [{"role": r["role"], "content": r["text"]} for r in shown], [r["id"] for r in shown]


# --- the admin page ------------------------------------------------------------------------------

def overview(status: dict, pending: int, approved: int, run: dict | None) -> str:
    line = (f"🤖 **{status['name']}** by {status['author']} · live: **{adapter_name(status['adapter_version'])}** · "
            f"corrections · 纠正: **{pending}** pending · 待审, **{approved}** approved · 已批准")
    if run:
        line += f" · retrain #{run['id']}: {OUTCOMES.get(run['status'], run['status'])}"
    return line


def corrections_frame(rows: list[dict]) -> pd.DataFrame:
    columns = ["id", "status", "channel", "question", "bot said", "correct answer", "by", "created"]
    return pd.DataFrame([[r["id"], r["status"], r["channel"], clip(r["question"], 200), clip(r["wrong_answer"], 200),
                          clip(r["corrected_answer"], 200), clip(r["submitter"], 14), (r["created_at"] or "")[:16]]
                         for r in rows], columns=columns)


def correction_choices(rows: list[dict]) -> list[tuple[str, int]]:
    """(label, id) pairs for the bulk-selection checkboxes."""
    return [(f"#{r['id']} {clip(r['question'], 40)}", r["id"]) for r in rows]


def progress_html(run: dict | None) -> str:
    """The current or last retrain as a progress bar: stage, step/total, loss and ETA from its row."""
    if run is None:
        return '<div id="retrain-state" data-status="none">No retrain yet · 尚未重训</div>'
    status, stage = run["status"], run.get("stage")
    step, total = run.get("step") or 0, run.get("total_steps") or 0
    parts = [f"Retrain #{run['id']}", OUTCOMES.get(status, status)]
    if status == "running":
        parts.append(STAGES.get(stage, stage or "starting · 启动中"))
        if total:
            parts.append(f"step {step}/{total}")
        if run.get("loss") is not None:
            parts.append(f"loss {run['loss']:.3f}")
        if run.get("eta_s") is not None and stage == "training":
            parts.append(f"ETA ≈ {duration(run['eta_s'])}")
        if run.get("cancel_requested"):
            parts.append("cancel requested · 正在取消")
    elif status == "queued":
        parts.append("waiting for the job runner (selfcog serve) · 等待任务进程")
    elif status == "promoted" and run.get("adapter_version"):
        parts.append(f"now live: adapter v{run['adapter_version']}")
    if status == "running" and stage == "training" and total:
        bar = f'<progress value="{step}" max="{total}" style="width:100%"></progress>'
    elif status in ("queued", "running"):
        bar = '<progress style="width:100%"></progress>'  # indeterminate: no step count in this stage
    else:
        bar = '<progress value="1" max="1" style="width:100%"></progress>'
    return (f'<div id="retrain-state" data-status="{html.escape(status)}" data-stage="{html.escape(stage or "")}">'
            f'{html.escape(" · ".join(parts))}{bar}</div>')


def losses_frame(losses: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({"step": [r["step"] for r in losses], "loss": [r["loss"] for r in losses]})


def run_report(run: dict | None) -> str:
    """The run's evaluation: outcome, the gate's reasons, the metrics table (run["report"])."""
    if run is None:
        return ""
    report = run.get("report") or {}
    lines = [f"### Retrain #{run['id']} · {OUTCOMES.get(run['status'], run['status'])}"]
    if report.get("seconds") is not None:
        lines.append(f"Took {duration(report['seconds'])} · 用时")
    dataset = report.get("dataset") or {}
    if dataset:
        facts = ", ".join(f"{k}: {v}" for k, v in dataset.items() if k not in ("path", "sha256") and not isinstance(v, (dict, list)))
        lines.append(f"Dataset · 数据集: {facts}")
    if report.get("reasons"):
        lines.append("Gate · 评估门槛: " + "; ".join(report["reasons"]))
    elif run["status"] == "promoted":
        lines.append(f"Gate passed · 通过评估: adapter v{report.get('adapter') or run.get('adapter_version')} is live")
    if run.get("error") and not report.get("reasons"):
        lines.append(f"```\n{run['error'][-1500:]}\n```")
    if report.get("table"):
        lines.append(f"```\n{report['table']}\n```")
    return "\n\n".join(lines)


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    columns = ["id", "status", "trigger", "by", "stage", "steps", "adapter", "started", "finished", "note"]
    return pd.DataFrame([[r["id"], r["status"], r["trigger"], clip(r["requested_by"], 14), r.get("stage") or "",
                          f"{r.get('step') or 0}/{r.get('total_steps') or '?'}",
                          f"v{r['adapter_version']}" if r.get("adapter_version") else "",
                          (r.get("started_at") or "")[:19], (r.get("finished_at") or "")[:19], clip(r.get("error"), 80)]
                         for r in runs], columns=columns)


def adapters_frame(rows: list[dict]) -> pd.DataFrame:
    columns = ["live", "version", "identity", "retention", "bleed", "run", "created", "activated"]
    data = []
    for r in rows:
        metrics = r.get("metrics") or {}
        data.append(["●" if r["active"] else "", f"v{r['version']}", metrics.get("identity_mean", ""),
                     metrics.get("retention", ""), metrics.get("bleed", ""), r.get("run_id") or "",
                     (r.get("created_at") or "")[:19], (r.get("activated_at") or "")[:19]])
    return pd.DataFrame(data, columns=columns)


def compare_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)
