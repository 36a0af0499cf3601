"""The retrain pipeline and the runner that picks up retrain requests.

    selfcog retrain --json          # runs one retrain here, now (claims it like the runner would)
    selfcog serve                   # runs JobRunner: requests from the web page and Telegram, + the schedule

One pipeline for every trigger: approved corrections + identity profile -> dataset -> ms-swift
LoRA in a worker process -> evaluation against what serves now -> gate -> activation (which every
serving process picks up within a second or two). Every stage writes its progress to the run's
row, so the web page, Telegram and the CLI all show the same progress from the same place. Any
failure, cancel or kill leaves the run marked as such and the previous adapter serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bot.engine import AdapterRef, Engine, check_adapter_folder
from bot.models import ResolvedModel
from finetune.dataset import DatasetError, answer_general_prompts, build_dataset
from finetune.evaluate import (EvalReport, GateThresholds, evaluate, gate, load_general_prompts, load_probes,
                               report_table)
from finetune.train import Recipe, TrainingCancelled, TrainingError, WarmWorkers, recipe_for, train_adapter
from store import Profile, Store, StoreError

log = logging.getLogger(__name__)

EVAL_MAX_NEW_TOKENS = 64  # identity shows in the first sentence; general answers are compared on their start
GENERAL_MAX_NEW_TOKENS = 64  # what every recipe in RECIPES.md was measured with


@dataclass(frozen=True)
class JobSettings:
    data_dir: Path
    cache_dir: Path
    device: str = "cpu"
    retrain_every_hours: float = 0.0  # 0 = no schedule
    retrain_min_corrections: int = 5
    gate_product: float = 0.9
    gate_other: float = 0.8
    gate_retention: float = GateThresholds.retention
    gate_bleed_tolerance: int = GateThresholds.bleed_tolerance
    gate_facts_drop: int = GateThresholds.facts_drop

    @property
    def thresholds(self) -> GateThresholds:
        return GateThresholds(identity_product=self.gate_product, identity_other=self.gate_other,
                              retention=self.gate_retention, bleed_tolerance=self.gate_bleed_tolerance,
                              facts_drop=self.gate_facts_drop)


# --- cached answers: the base model's general answers, and reports of weights that did not change ----

def _cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def general_answers(engine: Engine, model: ResolvedModel, cache_dir: Path) -> list[dict]:
    """The base model's own answers to the shipped general prompts, computed once per base model."""
    prompts = load_general_prompts()
    path = Path(cache_dir) / "general" / f"{model.name}-{_cache_key(prompts, GENERAL_MAX_NEW_TOKENS)}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    generate = lambda conversations: engine.generate(conversations, adapter=AdapterRef.BASE,  # noqa: E731
                                                      max_new_tokens=GENERAL_MAX_NEW_TOKENS)
    answers = answer_general_prompts(generate, prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(answers, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)
    return answers


def evaluate_weights(engine: Engine, adapter: str | Path, profile: Profile, base_general: list[dict],
                     cache_dir: Path | None = None, cache_as: str | None = None) -> EvalReport:
    """Evaluate base / the live adapter / a folder under the current profile.

    cache_as names weights that never change (the base model, a registered version), so their
    report under an unchanged profile and probe set is computed once."""
    probes = load_probes()
    general_eval = load_general_prompts("eval")
    path = None
    if cache_dir is not None and cache_as is not None:
        key = _cache_key(cache_as, profile, probes, general_eval, EVAL_MAX_NEW_TOKENS)
        path = Path(cache_dir) / "eval" / f"{key}.json"
        if path.exists():
            return EvalReport(**json.loads(path.read_text(encoding="utf-8")))
    base_answers = {g["prompt"]: g["answer"] for g in base_general}
    generate = lambda conversations: engine.generate(conversations, adapter=adapter,  # noqa: E731
                                                      max_new_tokens=EVAL_MAX_NEW_TOKENS)
    report = evaluate(generate, profile, probes, general_eval, base_answers)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = report.to_dict()
        data.pop("identity_mean")
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return report


def build_run_dataset(store: Store, base_general: list[dict], recipe: Recipe, seed: int):
    """The dataset the next retrain trains on (also what `selfcog export dataset` writes)."""
    return build_dataset(store.identity.current(), store.corrections.approved(), base_general, seed=seed,
                         **recipe.dataset_options())


# --- one retrain -----------------------------------------------------------------------------------

def run_retrain(run: dict, *, store: Store, engine: Engine, model: ResolvedModel, settings: JobSettings,
                recipe: Recipe | None = None, warm: WarmWorkers | None = None, trained: Path | None = None) -> dict:
    """Carry a claimed run from dataset to activation. Always ends the run; returns its report.

    warm: training workers started ahead of time (the job runner keeps one); None starts one cold.
    trained: an adapter folder trained elsewhere (``swift sft`` on several GPUs, say): skip the
    dataset and training, and put it through the same evaluation and gate."""
    run_id = run["id"]
    started = time.perf_counter()
    run_dir = Path(settings.data_dir) / "runs" / str(run_id)
    recipe = recipe or recipe_for(model, settings.device)
    report: dict = {"run_id": run_id, "status": None, "promoted": False, "adapter": None, "metrics": {}}

    def finish(status: str, fields: dict | None = None, **more) -> dict:
        report.update(status=status, seconds=round(time.perf_counter() - started, 1))
        store.runs.finish(run_id, status, report=report, **(fields or {}), **more)
        log.info("retrain #%s %s in %.0f s", run_id, status, report["seconds"])
        return report

    beating = threading.Event()
    threading.Thread(target=_heartbeat, args=(store, run_id, beating), daemon=True).start()
    try:
        if trained is not None:
            try:
                check_adapter_folder(trained)
            except ValueError as e:  # not an adapter, or a corrupt one (a missing folder is an OSError)
                raise TrainingError(str(e)) from None
            report["candidate_path"] = str(trained)
            base_general = general_answers(engine, model, settings.cache_dir)
            return finish(*evaluate_and_promote(run_id, Path(trained), store=store, engine=engine, model=model,
                                                settings=settings, report=report, base_general=base_general))

        # 1. dataset
        store.runs.progress(run_id, stage="dataset")
        if store.corrections.count("approved") == 0:
            report["reason"] = "no approved corrections: approve some first, then retrain"
            return finish("skipped", error=report["reason"])
        base_general = general_answers(engine, model, settings.cache_dir)
        dataset = build_run_dataset(store, base_general, recipe, seed=run_id)
        dataset_path = dataset.write_swift(run_dir / "dataset.jsonl")
        report["dataset"] = {**dataset.report, "path": str(dataset_path), "sha256": dataset.sha256}
        store.runs.update(run_id, recipe=recipe.__dict__ | {"lora_targets": list(recipe.lora_targets)},
                          dataset_hash=dataset.sha256, dataset_rows=len(dataset.rows))

        # 2. training, in a worker process
        store.runs.progress(run_id, stage="training", step=0)
        candidate = train_adapter(
            model, dataset_path, run_dir / "train", recipe,
            on_progress=lambda step, total, loss, eta: store.runs.progress(
                run_id, stage="training", step=step, total_steps=total, loss=loss, eta_s=eta),
            should_cancel=lambda: store.runs.cancel_requested(run_id), warm=warm)
        report["candidate_path"] = str(candidate)

        # 3 + 4. evaluation against what serves now, gate, promotion
        return finish(*evaluate_and_promote(run_id, candidate, store=store, engine=engine, model=model,
                                            settings=settings, report=report, base_general=base_general))
    except TrainingCancelled as e:
        report["reason"] = str(e)
        return finish("cancelled", error=str(e))
    except (TrainingError, DatasetError, StoreError, OSError) as e:
        log.error("retrain #%s failed: %s", run_id, e)
        report["reason"] = str(e)
        return finish("failed", error=str(e)[-4000:])
    except BaseException as e:  # anything else still ends the run, then propagates
        report["reason"] = f"{type(e).__name__}: {e}"
        finish("failed", error=report["reason"])
        raise
    finally:
        beating.set()


def _heartbeat(store: Store, run_id: int, stop: threading.Event, every_s: float = 30.0) -> None:
    """Keep the run's heartbeat fresh through long stages (evaluation reports no steps)."""
    while not stop.wait(every_s):
        try:
            store.runs.heartbeat(run_id)
        except Exception as e:  # a busy database must not kill the retrain
            log.warning("heartbeat for retrain #%s failed: %s", run_id, e)


def evaluate_and_promote(run_id: int, candidate: Path, *, store: Store, engine: Engine, model: ResolvedModel,
                         settings: JobSettings, report: dict, base_general: list[dict]) -> tuple[str, dict]:
    """Evaluate a candidate adapter against what serves now; promote it only if it passes the gate.

    Returns (final status, fields for the run row); fills ``report`` in place."""
    store.runs.progress(run_id, stage="evaluating")
    profile = store.identity.current()
    active = store.adapters.active()
    active_name = f"v{active['version']}" if active else "base"
    active_report = evaluate_weights(engine, AdapterRef.BASE if active is None else AdapterRef.ACTIVE,
                                     profile, base_general, settings.cache_dir, cache_as=f"{model.name}/{active_name}")
    if store.runs.cancel_requested(run_id):
        raise TrainingCancelled("cancelled during evaluation")
    candidate_report = evaluate_weights(engine, candidate, profile, base_general)
    passed, reasons = gate(candidate_report, active_report, settings.thresholds)
    report["candidate_path"] = str(candidate)
    report["metrics"] = {"candidate": _summary(candidate_report), active_name: _summary(active_report)}
    report["table"] = report_table({active_name: active_report, "candidate": candidate_report})
    report["reasons"] = reasons
    run_dir = Path(settings.data_dir) / "runs" / str(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(
        {**report, "candidate_details": candidate_report.to_dict()}, ensure_ascii=False, indent=1), encoding="utf-8")
    if not passed:
        return "rejected", {"metrics": report["metrics"], "error": "; ".join(reasons)}

    # Keep the folder with the versions, then make it live everywhere.
    store.runs.progress(run_id, stage="activating")
    adapter_dir = Path(settings.data_dir) / "adapters" / f"run{run_id}"
    shutil.copytree(candidate, adapter_dir, dirs_exist_ok=True)
    version = store.adapters.register(path=str(adapter_dir.resolve()), base_model=model.name, run_id=run_id,
                                      metrics=_summary(candidate_report))
    _cache_report(candidate_report, settings.cache_dir, f"{model.name}/v{version}", profile)
    store.adapters.activate(version, by=f"retrain #{run_id}")
    report.update(promoted=True, adapter=version)
    return "promoted", {"adapter_version": version, "metrics": report["metrics"]}


def _summary(report: EvalReport) -> dict:
    return {"identity": report.identity, "identity_mean": round(report.identity_mean, 3),
            "retention": round(report.retention, 3), "bleed": report.bleed, "facts": list(report.facts)}


def _cache_report(report: EvalReport, cache_dir: Path, name: str, profile: Profile) -> None:
    """A promoted candidate's report is the new active adapter's: no need to evaluate it again."""
    key = _cache_key(name, profile, load_probes(), load_general_prompts("eval"), EVAL_MAX_NEW_TOKENS)
    path = Path(cache_dir) / "eval" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    data.pop("identity_mean")
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


# --- the runner in `selfcog serve` -------------------------------------------------------------------

class JobRunner:
    """Picks up queued retrains one at a time, and asks for scheduled ones.

    The schedule is a check against the store, not an in-memory timer, so it survives restarts and
    several processes agree on it: due when the interval has passed since the last retrain and at
    least N corrections were approved since. Admins can change both on the admin page."""

    def __init__(self, settings: JobSettings, store: Store, *, model: ResolvedModel, engine: Engine,
                 poll_s: float = 1.0, recipe: Recipe | None = None):
        self.settings = settings
        self.recipe = recipe  # None: recipe_for(model, device)
        self.store = store
        self.model = model
        self.engine = engine
        self.poll_s = poll_s

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self._loop, args=(stop,), name="retrain-runner", daemon=True)
        thread.start()
        return thread

    def _loop(self, stop: threading.Event) -> None:
        warm = WarmWorkers(prestart=True)  # a retrain then skips the worker's imports
        try:
            while not stop.is_set():
                try:
                    self.request_if_due()
                    run = self.store.runs.claim_next()
                    if run is not None:
                        run_retrain(run, store=self.store, engine=self.engine, model=self.model,
                                    settings=self.settings, recipe=self.recipe, warm=warm)
                        warm.prepare()  # only now: a worker starting during training slows it
                        continue
                except Exception:
                    log.exception("retrain runner: unexpected error (it keeps running)")
                stop.wait(self.poll_s)
        finally:
            warm.close()

    def schedule(self) -> tuple[float, int]:
        """(interval hours, minimum new approved corrections); the admin page's values win over env."""
        hours = self.store.settings.get("retrain_every_hours", self.settings.retrain_every_hours)
        minimum = self.store.settings.get("retrain_min_corrections", self.settings.retrain_min_corrections)
        return float(hours or 0), int(minimum)

    def request_if_due(self) -> dict | None:
        hours, minimum = self.schedule()
        if hours <= 0 or self.store.runs.active() is not None:
            return None
        last = self.store.runs.list(limit=1)
        since = last[0]["created_at"] if last else None
        if since and datetime.fromisoformat(since) > datetime.now(timezone.utc) - timedelta(hours=hours):
            return None
        last_trained = self.store.runs.last_finished(("promoted", "rejected"))
        if self.store.corrections.approved_since(last_trained["started_at"] if last_trained else None) < minimum:
            return None
        try:
            return self.store.runs.request("schedule", "schedule")
        except StoreError:
            return None
