"""How stored rows look on the pages: plain functions from rows and RunSummary to Markdown, HTML and tables.

No Gradio here, so each view is testable in a millisecond and both pages render the same facts
the same way. Text that came from users or logs is escaped before it lands in HTML.
"""

from __future__ import annotations

import html

import pandas as pd

from bot.run_summary import RunSummary, duration

STATUS_ICONS = {"queued": "⏳", "running": "🏃", "promoted": "✅", "rejected": "🚫", "failed": "❌",
                "cancelled": "⏹️", "skipped": "⏭️"}


def clip(text: str | None, limit: int = 120) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def adapter_name(version: int | None) -> str:
    return f"adapter v{version}" if version else "base model · 基础模型"


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

def overview(facts: dict) -> str:
    """One line from Admin.overview(): who the bot is, what is live, corrections waiting, the last retrain."""
    line = (f"🤖 **{facts['name']}** by {facts['author']} · live: **{adapter_name(facts['adapter'])}** · "
            f"corrections · 纠正: **{facts['pending_corrections']}** pending · 待审, "
            f"**{facts['approved_corrections']}** approved · 已批准")
    run = facts.get("retrain")
    if run is not None:
        line += f" · retrain #{run.id}: {STATUS_ICONS.get(run.status, '')} {run.status}"
    return line


def corrections_frame(rows: list[dict]) -> pd.DataFrame:
    """The review queue, question and the correct answer first so both fit on the screen."""
    columns = ["id", "question", "correct answer", "bot said", "status", "channel", "by", "created"]
    return pd.DataFrame([[r["id"], clip(r["question"], 160), clip(r["corrected_answer"], 240),
                          clip(r["wrong_answer"], 120), r["status"], r["channel"], clip(r["submitter"], 14),
                          (r["created_at"] or "")[:16]] for r in rows], columns=columns)


def correction_choices(rows: list[dict]) -> list[tuple[str, int]]:
    """(label, id) pairs for the bulk-selection checkboxes: the question and its answer, to tell them apart."""
    return [(f"#{r['id']} {clip(r['question'], 40)} → {clip(r['corrected_answer'], 50)}", r["id"]) for r in rows]


def progress_html(run: RunSummary | None) -> str:
    """The current or last retrain: its one-line outcome over a bar (red when it failed or was refused)."""
    if run is None:
        return '<div id="retrain-state" data-status="none">No retrain yet · 尚未重训</div>'
    if not run.finished:
        bar = ('<progress></progress>' if run.percent is None  # indeterminate: no step count in this stage
               else f'<progress value="{run.percent}" max="100"></progress>')
        ok = "true"
    else:  # a full bar, its colour by data-ok (ui/app.py's CSS): green, red, or grey
        bar = '<div class="run-bar"></div>'
        ok = "neutral" if run.status in ("cancelled", "skipped") else str(run.ok).lower()
    status, stage = html.escape(run.status), html.escape(run.stage or "")
    return (f'<div id="retrain-state" data-status="{status}" data-stage="{stage}" data-ok="{ok}">'
            f'{STATUS_ICONS.get(run.status, "")} {html.escape(run.outcome_line)}{bar}</div>')


def losses_frame(losses: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({"step": [r["step"] for r in losses], "loss": [r["loss"] for r in losses]})


def run_report(run: RunSummary | None) -> str:
    """A finished run in full: its outcome, every reason of the gate, time per phase, the evaluation table."""
    if run is None or not run.finished:
        return ""
    lines = [f"### {STATUS_ICONS.get(run.status, '')} {html.escape(run.outcome_line)}"]
    if run.status == "promoted":
        lines.append("Gate passed · 通过评估")
    if len(run.reasons) > 1:
        lines.append("Gate · 评估门槛:\n" + "\n".join(f"- {html.escape(reason)}" for reason in run.reasons))
    if run.seconds is not None:
        phases = ", ".join(f"{html.escape(name)} {duration(s)}" for name, s in run.phases.items())
        lines.append(f"Took {duration(run.seconds)}" + (f" ({phases})" if phases else "") + " · 用时")
    if run.status == "failed" and run.error:
        lines.append(f"```\n{run.error[-1500:]}\n```")
    if run.table:
        lines.append(f"```\n{run.table}\n```")
    return "\n\n".join(lines)


def runs_frame(runs: list[RunSummary]) -> pd.DataFrame:
    columns = ["id", "status", "trigger", "by", "steps", "adapter", "took", "outcome"]
    return pd.DataFrame([[r.id, r.status, r.trigger, clip(r.requested_by, 14),
                          f"{r.step or 0}/{r.total_steps or '?'}", f"v{r.adapter_version}" if r.adapter_version else "",
                          duration(r.seconds), r.outcome_line] for r in runs], columns=columns)


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
