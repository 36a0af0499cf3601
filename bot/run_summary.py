"""A retrain run as plain facts, so the web page, Telegram and the CLI only format it.

    >>> summary = summarize(store.runs.get(3))
    >>> summary.outcome_line
    'Retrain #3 rejected: identity under product 0.62 < 0.90. Approve more corrections that state the identity, then retrain.'
    >>> summary.percent, duration(summary.seconds)
    (100, '9 min 41 s')

The run row comes from store/runs.py; its ``report`` (finetune/jobs.py) adds the gate's reasons,
the metrics, the seconds taken and the time spent in each phase. Nothing here reads the store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime

STAGES = {"dataset": "building the dataset", "training": "training", "evaluating": "evaluating",
          "activating": "activating"}
FINISHED = ("promoted", "rejected", "failed", "cancelled", "skipped")

# What to do after a refusal: the gate says (finetune/evaluate.py, report["advice"]); older reports
# carry no advice.
_DEFAULT_ADVICE = "The live weights stay; review the corrections, then retrain."


@dataclass(frozen=True)
class RunSummary:
    id: int
    status: str  # queued | running | promoted | rejected | failed | cancelled | skipped
    stage: str | None  # dataset | training | evaluating | activating, while running
    stage_label: str  # the stage in words ("building the dataset"), or the status when there is none
    step: int | None
    total_steps: int | None
    loss: float | None
    eta_s: float | None
    percent: int | None  # training progress 0-100; 100 once promoted; None when unknown
    finished: bool
    ok: bool  # False only for rejected and failed runs (a red bar, not a green one)
    outcome_line: str  # one line: what happened and what to do
    reasons: list[str] = field(default_factory=list)  # the gate's, when it refused the candidate
    metrics: dict = field(default_factory=dict)  # {"candidate": {...}, "v1": {...}}
    phases: dict = field(default_factory=dict)  # stage -> seconds, when the report records them
    seconds: float | None = None  # how long the run took (so far)
    adapter_version: int | None = None  # the version it made live
    trigger: str | None = None  # cli | web | telegram | schedule
    requested_by: str | None = None
    error: str | None = None  # the whole error text of a failed run (may be many lines)
    table: str | None = None  # the evaluation table, as text
    cancel_requested: bool = False
    waiting_for_runner: bool = False  # queued where no job runner is alive

    def to_dict(self) -> dict:
        return asdict(self)


def duration(seconds: float | None) -> str:
    """45 s, 3 min 05 s, 1 h 02 min; '?' when unknown."""
    if seconds is None:
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def summarize(run: dict) -> RunSummary:
    """The facts of one run row (store.runs.get / list / active), ready to format."""
    report = run.get("report") or {}
    status, stage = run["status"], run.get("stage")
    step, total = run.get("step"), run.get("total_steps")
    reasons = [str(r) for r in report.get("reasons") or []]
    adapter_version = run.get("adapter_version") or report.get("adapter")
    if status == "running" and stage == "training" and total:
        percent = min(100, 100 * (step or 0) // total)
    elif status == "promoted":
        percent = 100
    else:
        percent = None
    summary = dict(
        id=run["id"], status=status, stage=stage if status == "running" else None,
        stage_label=STAGES.get(stage, stage or "starting") if status == "running" else status,
        step=step, total_steps=total, loss=run.get("loss"), eta_s=run.get("eta_s"), percent=percent,
        finished=status in FINISHED, ok=status not in ("rejected", "failed"), reasons=reasons,
        metrics=report.get("metrics") or run.get("metrics") or {}, phases=dict(report.get("phases") or {}),
        seconds=report.get("seconds") if report.get("seconds") is not None else _elapsed(run),
        adapter_version=adapter_version, trigger=run.get("trigger"), requested_by=run.get("requested_by"),
        error=run.get("error") or report.get("reason"), table=report.get("table"),
        cancel_requested=bool(run.get("cancel_requested")), waiting_for_runner=bool(run.get("waiting_for_runner")))
    return RunSummary(**summary, outcome_line=_outcome_line(run, report, summary))


def _outcome_line(run: dict, report: dict, s: dict) -> str:
    number, status = f"Retrain #{run['id']}", s["status"]
    if status == "queued":
        if s["waiting_for_runner"]:
            return f"{number} is queued, but no job runner is running: start `selfcog serve` to train it."
        return f"{number} is queued: it starts as soon as the job runner picks it up."
    if status == "running":
        details = [s["stage_label"]]
        if s["stage"] == "training" and s["total_steps"]:
            details.append(f"step {s['step'] or 0}/{s['total_steps']} ({s['percent']}%)")
            if s["loss"] is not None:
                details.append(f"loss {s['loss']:.3f}")
            if s["eta_s"]:
                details.append(f"about {duration(s['eta_s'])} left")
        if s["cancel_requested"]:
            details.append("cancel requested")
        return f"{number}: " + ", ".join(details) + "."
    if status == "promoted":
        return f"{number} promoted: adapter v{s['adapter_version']} is live."
    if status == "rejected":
        why = s["reasons"][0] if s["reasons"] else (s["error"] or "the candidate did not pass the gate")
        more = f" (+{len(s['reasons']) - 1} more)" if len(s["reasons"]) > 1 else ""
        return f"{number} rejected: {why}{more}. {report.get('advice') or _DEFAULT_ADVICE}"
    if status == "cancelled":
        return f"{number} cancelled; the live weights stay."
    if status == "skipped":
        return f"{number} skipped: {_last_line(s['error']) or 'nothing to train'}."
    return (f"{number} failed: {_last_line(s['error']) or 'unknown error'}. The previous adapter stays live; "
            "fix the cause and retrain.")


def _last_line(text: str | None, limit: int = 200) -> str:
    """The most telling line of an error (the last non-empty one: a traceback or a worker's log ends there)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    line = lines[-1].rstrip(".") if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _elapsed(run: dict) -> float | None:
    started = run.get("started_at")
    if not started:
        return None
    end = run.get("finished_at")
    try:
        begin = datetime.fromisoformat(started)
        stop = datetime.fromisoformat(end) if end else datetime.now(begin.tzinfo)
    except ValueError:
        return None
    return round((stop - begin).total_seconds(), 1)
