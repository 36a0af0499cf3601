"""The retrain pipeline and the runner that picks up retrain requests.

    selfcog retrain --json          # runs one retrain here, now (claims it like the runner would)
    selfcog serve                   # runs JobRunner: requests from the web page and Telegram, + the schedule

One pipeline for every trigger: approved corrections + identity profile -> dataset -> ms-swift
LoRA in this process (on the engine's own weights where it lends them, on a GPU; or a worker process,
SELFCOG_TRAINER=worker) -> evaluation against what serves now -> gate -> activation (which every
serving process picks up within a second or two). Every stage writes its progress to the run's
row, so the web page, Telegram and the CLI all show the same progress from the same place. Any
failure, cancel or kill leaves the run marked as such and the previous adapter serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bot.engines import AdapterFolderError, AdapterRef, Engine, check_adapter_folder
from bot.errors import UserError
from bot.models import ResolvedModel
from finetune.dataset import answer_general_prompts, build_dataset
from finetune.evaluate import (EvalReport, GateThresholds, evaluate, gate, load_general_prompts, load_probes,
                               report_table)
from finetune.train import (Recipe, TrainingCancelled, TrainingError, WarmWorkers, recipe_for, resolve_trainer,
                            train_adapter)
from finetune.in_process import warm_up
from finetune.worker import training_gpus
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
    gate: GateThresholds = GateThresholds()
    trainer: str = "auto"  # "in-process" | "worker" | "auto": see finetune/train.py's resolve_trainer
    prepare_ahead: bool = False  # the job runner computes what the first retrain needs at start (JobRunner.prepare_ahead)


# --- cached answers: the base model's general answers, and reports of weights that did not change ----

def _cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _precision(engine: Engine, evaluation: bool) -> str | None:
    """What the engine computes such answers in (bf16 and fp32 answers differ in places): part of their cache key.
    bf16 products on fp32 weights are not a bf16 engine's arithmetic, and a cache dir may be shared by both."""
    served = getattr(engine, "precision", None)
    computed = getattr(engine, "eval_precision", served) if evaluation else served
    return served if computed == served else f"{computed} products on {served} weights"


def general_answers(engine: Engine, model: ResolvedModel, cache_dir: Path, *, evaluation: bool = False) -> list[dict]:
    """The base model's own answers to the shipped general prompts, computed once per base model.

    As served: the replay rows a dataset mixes in. ``evaluation``: as the engine evaluates, which is what
    an evaluation compares a candidate's answers with (the same answers where it evaluates as it serves)."""
    prompts = load_general_prompts()
    key = _cache_key(prompts, GENERAL_MAX_NEW_TOKENS, _precision(engine, evaluation))
    path = Path(cache_dir) / "general" / f"{model.name}-{key}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    generate = lambda conversations: engine.generate(conversations, adapter=AdapterRef.BASE,  # noqa: E731
                                                      max_new_tokens=GENERAL_MAX_NEW_TOKENS, evaluation=evaluation)
    answers = answer_general_prompts(generate, prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(answers, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)
    return answers


def weights_id(model: ResolvedModel, adapter_dir: str | Path | None = None) -> str:
    """A name for exactly these weights: the base model's name, plus a hash of the adapter's own files.

    Version numbers are no key: "v1" of one data directory is not "v1" of another sharing the cache,
    while a promoted copy of a candidate (the same files plus selfcog.json) is the same weights."""
    if adapter_dir is None:
        return f"{model.name}/base"
    digest = hashlib.sha256()
    for path in sorted(Path(adapter_dir).glob("adapter_*")):  # adapter_config.json + adapter_model.*
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"{model.name}/lora-{digest.hexdigest()[:16]}"


def evaluate_weights(engine: Engine, adapter: str | Path, profile: Profile, base_general: list[dict], *,
                     previous: list[Profile] = (), cache_dir: Path | None = None,
                     weights: str | None = None, fast: bool = True) -> EvalReport:
    """Evaluate base / the live adapter / a folder under the current profile (``previous``: earlier ones).

    ``fast``: in the engine's evaluation precision (``eval_precision``), else as it serves. ``base_general``:
    the base's answers computed the same way (``general_answers(..., evaluation=fast)``), to compare the
    general answers with. ``weights`` (``weights_id``) names the weights being evaluated: their report
    under an unchanged profile and probe set is computed once and kept in ``cache_dir``."""
    path = None
    if cache_dir is not None and weights is not None:
        key = _cache_key(weights, _precision(engine, evaluation=fast),
                         profile, list(previous), load_probes(), load_general_prompts("eval"), EVAL_MAX_NEW_TOKENS)
        path = Path(cache_dir) / "eval" / f"{key}.json"
        if path.exists():
            return EvalReport.from_dict(json.loads(path.read_text(encoding="utf-8")))
    base_answers = {g["prompt"]: g["answer"] for g in base_general}
    generate = lambda conversations: engine.generate(conversations, adapter=adapter,  # noqa: E731
                                                      max_new_tokens=EVAL_MAX_NEW_TOKENS, evaluation=fast)
    report = evaluate(generate, profile, load_probes(), load_general_prompts("eval"), base_answers, previous=previous)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), ensure_ascii=False), encoding="utf-8")
    return report


def evaluate_current(store: Store, engine: Engine, model: ResolvedModel, cache_dir: Path,
                     target: str | Path | None = None, label: str = "adapter") -> dict[str, EvalReport]:
    """Base, the live adapter and (optionally) another folder under the current profile (`selfcog eval`)."""
    profile, previous = store.identity.current(), earlier_profiles(store)
    base_general = general_answers(engine, model, cache_dir, evaluation=True)
    cached = dict(previous=previous, cache_dir=cache_dir)
    reports = {"base": evaluate_weights(engine, AdapterRef.BASE, profile, base_general, **cached,
                                        weights=weights_id(model))}
    if (live := store.adapters.active()) is not None:
        reports[f"active v{live['version']}"] = evaluate_weights(engine, AdapterRef.ACTIVE, profile, base_general,
                                                                 **cached, weights=weights_id(model, live["path"]))
    if target is not None:
        reports[label] = evaluate_weights(engine, target, profile, base_general, **cached,
                                          weights=weights_id(model, target))
    return reports


def within_drift(thresholds: GateThresholds) -> GateThresholds:
    """The gate loosened by how far bf16 matrix products moved its numbers from fp32's, with room to spare.
    Over ten adapters (RECIPES.md, "Evaluating in bf16") a way's identity moved by up to 0.06, retention by
    0.09, facts by 1 and bleed by 2 answers; a candidate this gate refuses is no near miss."""
    return replace(thresholds, identity_product=thresholds.identity_product - 0.1,
                   identity_other=thresholds.identity_other - 0.1, retention=thresholds.retention - 0.15,
                   facts_drop=thresholds.facts_drop + 2, bleed_share=thresholds.bleed_share + 0.03,
                   identity_tolerance=thresholds.identity_tolerance + 0.1, old_identity=thresholds.old_identity + 2)


def earlier_profiles(store: Store) -> list[Profile]:
    """The profiles the bot had before the current one (oldest first): what a rename replaced."""
    current = store.identity.current()
    seen = {}
    for row in reversed(store.identity.history()):
        profile = Profile(row["name"], row["author"])
        if (profile.name, profile.author) != (current.name, current.author):
            seen[(profile.name, profile.author)] = profile
    return list(seen.values())


def build_run_dataset(store: Store, base_general: list[dict], recipe: Recipe, seed: int):
    """The dataset the next retrain trains on (also what `selfcog export dataset` writes)."""
    return build_dataset(store.identity.current(), store.corrections.approved(), base_general, seed=seed,
                         previous=earlier_profiles(store), **recipe.dataset_options())


# --- one retrain -----------------------------------------------------------------------------------

def run_retrain(run: dict, *, store: Store, engine: Engine, model: ResolvedModel, settings: JobSettings,
                recipe: Recipe | None = None, warm: WarmWorkers | None = None, trained: Path | None = None) -> dict:
    """Carry a claimed run from dataset to activation. Always ends the run; returns its report.

    warm: training workers started ahead of time (the job runner keeps one); None starts one cold.
    trained: an adapter folder trained elsewhere (``swift sft`` on several GPUs, say): skip the
    dataset and training, and put it through the same evaluation and gate.
    The report's ``phases`` gives the seconds of each stage: dataset, worker_start, training,
    evaluation, swap. worker_start ends at the first progress event: the first step is done when
    the worker starts with weights already loaded, and on several GPUs (ms-swift logs per step)."""
    run_id = run["id"]
    started = time.perf_counter()
    run_dir = Path(settings.data_dir) / "runs" / str(run_id)
    phases: dict[str, float] = {}
    report: dict = {"run_id": run_id, "status": None, "promoted": False, "adapter": None, "metrics": {},
                    "phases": phases}

    def finish(status: str, fields: dict | None = None, **more) -> dict:
        report.update(status=status, seconds=round(time.perf_counter() - started, 1))
        store.runs.finish(run_id, status, report=report, **(fields or {}), **more)
        log.info("retrain #%s %s in %.0f s (%s)", run_id, status, report["seconds"],
                 ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
        return report

    beating = threading.Event()
    threading.Thread(target=_heartbeat, args=(store, run_id, beating), daemon=True).start()
    try:
        in_process = trains_in_process(settings, engine)
        trainer = "in-process" if in_process else "worker"
        if recipe is None:
            recipe = recipe_for(model, settings.device, trainer)  # a bad SELFCOG_TRAIN_DTYPE fails the run here
            if not settings.prepare_ahead:  # compiled layers save ~3 s a retrain once compiled (~75 s the first
                recipe = replace(recipe, compiled_layers=False)  # time in a process): only after a warm-up
        if trained is not None:
            try:
                check_adapter_folder(trained, model)
            except AdapterFolderError as e:  # not a LoRA for this base model; a missing folder says so too
                raise TrainingError(str(e)) from None
            report["candidate_path"] = str(trained)
            return finish(*evaluate_and_promote(run_id, Path(trained), store=store, engine=engine, model=model,
                                                settings=settings, report=report))

        # 1. dataset
        clock = time.perf_counter()
        store.runs.progress(run_id, stage="dataset")
        if store.corrections.count("approved") == 0:
            report["reason"] = "no approved corrections: approve some first, then retrain"
            return finish("skipped", error=report["reason"])
        base_general = general_answers(engine, model, settings.cache_dir)
        dataset = build_run_dataset(store, base_general, recipe, seed=run_id)
        dataset_path = dataset.write_swift(run_dir / "dataset.jsonl")
        report["dataset"] = {**dataset.report, "path": str(dataset_path), "sha256": dataset.sha256}
        report["recipe"] = recipe.to_dict()
        store.runs.update(run_id, recipe=report["recipe"], dataset_hash=dataset.sha256, dataset_rows=len(dataset.rows))
        phases["dataset"] = round(time.perf_counter() - clock, 1)

        # 2. training, in a worker process; its start (imports, weights) is timed apart from the steps
        clock = time.perf_counter()
        store.runs.progress(run_id, stage="training", step=0)

        steps_clock: dict[str, float] = {}  # when the first progress event came, and the last step ended

        def on_progress(step, total, loss, eta):
            if "worker_start" not in phases:
                phases["worker_start"] = round(time.perf_counter() - clock, 1)
            steps_clock.setdefault("first", time.perf_counter())
            if step:
                steps_clock["last"] = time.perf_counter()
            if eta is not None:  # chats held back meanwhile hear the training's own ETA (+ giving the weights back)
                engine.expect_back_in(eta + 1)
            store.runs.progress(run_id, stage="training", step=step, total_steps=total, loss=loss, eta_s=eta)

        with engine.pause_for_training(expected_s=_expected_training_s(store), lend=in_process) as lent:
            candidate = train_adapter(model, dataset_path, run_dir / "train", recipe, on_progress=on_progress,
                                      should_cancel=lambda: store.runs.cancel_requested(run_id), warm=warm,
                                      trainer=trainer, lent=lent,
                                      device=engine.device)
        phases.setdefault("worker_start", 0.0)
        phases["training"] = round(time.perf_counter() - clock - phases["worker_start"], 1)
        if "last" in steps_clock:  # where the training's seconds went: the steps, and saving + giving back after
            report["training_split"] = {"steps": round(steps_clock["last"] - steps_clock["first"], 1),
                                        "after_steps": round(time.perf_counter() - steps_clock["last"], 1)}
        report["candidate_path"] = str(candidate)

        # 3 + 4. evaluation against the base and what serves now, gate, promotion
        return finish(*evaluate_and_promote(run_id, candidate, store=store, engine=engine, model=model,
                                            settings=settings, report=report))
    except TrainingCancelled as e:
        report["reason"] = str(e)
        return finish("cancelled", error=str(e))
    except (TrainingError, UserError, OSError) as e:
        log.error("retrain #%s failed: %s", run_id, e)
        report["reason"] = str(e)
        return finish("failed", error=str(e)[-4000:])
    except BaseException as e:  # anything else still ends the run, then propagates
        report["reason"] = f"{type(e).__name__}: {e}"
        finish("failed", error=report["reason"])
        raise
    finally:
        beating.set()


def trains_in_process(settings: JobSettings, engine: Engine) -> bool:
    """In process unless SELFCOG_TRAIN_GPUS names GPUs of its own, or the engine sits on a GPU other than
    the first (transformers' Trainer places a model on cuda:0): those train in worker processes."""
    return (resolve_trainer(settings.trainer) == "in-process" and not training_gpus()
            and engine.device in ("cpu", "cuda", "cuda:0"))


def _expected_training_s(store: Store) -> float | None:
    """How long the last promoted or rejected retrain trained: what chats are told to wait meanwhile."""
    last = store.runs.last_finished(("promoted", "rejected"))
    phases = ((last or {}).get("report") or {}).get("phases") or {}
    seconds = phases.get("training", 0) + phases.get("worker_start", 0)
    return seconds or None


def _heartbeat(store: Store, run_id: int, stop: threading.Event, every_s: float = 30.0) -> None:
    """Keep the run's heartbeat fresh through long stages (evaluation reports no steps)."""
    while not stop.wait(every_s):
        try:
            store.runs.heartbeat(run_id)
        except Exception as e:  # a busy database must not kill the retrain
            log.warning("heartbeat for retrain #%s failed: %s", run_id, e)


def evaluate_and_promote(run_id: int, candidate: Path, *, store: Store, engine: Engine, model: ResolvedModel,
                         settings: JobSettings, report: dict) -> tuple[str, dict]:
    """Evaluate a candidate adapter against the base and the live adapter; promote it if it passes the gate.

    All three are scored under the *current* profile: the base and the live version once per profile
    (cached), the candidate now; in the engine's evaluation precision, and a refusal there that its drift
    could explain again as the engine serves (``first_look`` in the report then says what the first
    evaluation decided). Returns (final status, fields for the run row); fills ``report``."""
    clock = time.perf_counter()
    store.runs.progress(run_id, stage="evaluating")
    profile, previous = store.identity.current(), earlier_profiles(store)
    live = store.adapters.active()

    def evaluated(fast: bool) -> tuple[EvalReport, EvalReport | None, EvalReport]:
        base_general = general_answers(engine, model, settings.cache_dir, evaluation=fast)
        cached = dict(previous=previous, cache_dir=settings.cache_dir, fast=fast)
        base_report = evaluate_weights(engine, AdapterRef.BASE, profile, base_general, **cached,
                                       weights=weights_id(model))
        live_report = None if live is None else evaluate_weights(
            engine, AdapterRef.ACTIVE, profile, base_general, **cached, weights=weights_id(model, live["path"]))
        if store.runs.cancel_requested(run_id):
            raise TrainingCancelled("cancelled during evaluation")
        return base_report, live_report, evaluate_weights(engine, candidate, profile, base_general, **cached,
                                                          weights=weights_id(model, candidate))

    base_report, live_report, candidate_report = evaluated(fast=True)
    verdict = gate(candidate_report, base_report, live_report, settings.gate)
    report["eval_precision"] = getattr(engine, "eval_precision", None)  # what its answers' products computed in
    if (not verdict.passed and _precision(engine, evaluation=True) != _precision(engine, evaluation=False)
            and gate(candidate_report, base_report, live_report, within_drift(settings.gate)).passed):
        # The gate's numbers were sized on answers computed as served, and bf16 products move a near-tie now
        # and then: of ten good adapters, one fell a single answer under the retention floor (RECIPES.md,
        # "Evaluating in bf16"). A refusal by less than that drift is only final as served; a pass, or a
        # refusal by more (an adapter that did not learn at all), stands.
        report["first_look"] = {"precision": report["eval_precision"], "verdict": verdict.line,
                                "seconds": round(time.perf_counter() - clock, 1)}
        log.info("retrain #%s: %s (%s); evaluating again as served", run_id, verdict.line, report["eval_precision"])
        base_report, live_report, candidate_report = evaluated(fast=False)
        verdict = gate(candidate_report, base_report, live_report, settings.gate)
        report["eval_precision"] = getattr(engine, "precision", None)
    live_name = f"v{live['version']}" if live else "base"
    columns = {"base": base_report, **({live_name: live_report} if live_report else {}), "candidate": candidate_report}
    report["candidate_path"] = str(candidate)
    report["metrics"] = {name: _summary(r) for name, r in columns.items()}
    report["table"] = report_table(columns)
    report["reasons"] = verdict.reasons
    report["verdict"] = verdict.line
    report["advice"] = verdict.advice
    report["phases"]["evaluation"] = round(time.perf_counter() - clock, 1)
    run_dir = Path(settings.data_dir) / "runs" / str(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(
        {**report, "candidate_details": candidate_report.to_dict()}, ensure_ascii=False, indent=1), encoding="utf-8")
    if not verdict.passed:
        report["reason"] = verdict.line
        return "rejected", {"metrics": report["metrics"], "error": verdict.line}

    # Keep the folder with the versions, describing itself, then make it live everywhere.
    clock = time.perf_counter()
    store.runs.progress(run_id, stage="activating")
    version = max((a["version"] for a in store.adapters.list()), default=0) + 1  # one retrain at a time: no race
    adapter_dir = (Path(settings.data_dir) / "adapters" / f"v{version}").resolve()
    shutil.copytree(candidate, adapter_dir, dirs_exist_ok=True)
    _write_adapter_card(adapter_dir, version=version, run_id=run_id, model=model, profile=profile, report=report,
                        metrics=_summary(candidate_report))
    registered = store.adapters.register(path=str(adapter_dir), base_model=model.name, run_id=run_id,
                                         metrics=_summary(candidate_report))
    if registered != version:  # only if an adapter was registered by hand meanwhile; the row keeps the path
        log.warning("adapter v%s was saved in %s", registered, adapter_dir)
    store.adapters.activate(registered, by=f"retrain #{run_id}")
    engine.refresh_adapter()  # this process swaps now; every other one on its next poll
    report["phases"]["swap"] = round(time.perf_counter() - clock, 1)
    report.update(promoted=True, adapter=registered)
    return "promoted", {"adapter_version": registered, "metrics": report["metrics"]}


ADAPTER_CARD = "selfcog.json"


def _write_adapter_card(folder: Path, *, version: int, run_id: int, model: ResolvedModel, profile: Profile,
                        report: dict, metrics: dict) -> None:
    """selfcog.json beside the weights: what this adapter is, so a moved or re-imported folder says so itself."""
    card = {
        "version": version, "run_id": run_id, "base_model": model.name, "base_model_path": str(model.path),
        "profile": {"name": profile.name, "author": profile.author, "description": profile.description},
        "recipe": report.get("recipe"), "dataset_sha256": (report.get("dataset") or {}).get("sha256"),
        "metrics": metrics, "verdict": report.get("verdict"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = folder / ADAPTER_CARD
    path.write_text(json.dumps(card, ensure_ascii=False, indent=1), encoding="utf-8")


def _summary(report: EvalReport) -> dict:
    return {"identity": report.identity, "identity_mean": round(report.identity_mean, 3),
            "retention": round(report.retention, 3), "bleed": report.bleed, "facts": list(report.facts),
            "old_identity": report.old_identity}


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
        # The next retrain starts warm: a worker process waits with its imports done, or ms-swift is
        # imported here ahead of time when training runs in this process.
        trainer = resolve_trainer(self.settings.trainer)
        warm = WarmWorkers(prestart=trainer == "worker")
        if trainer == "in-process":
            try:
                warm_up(self.model, (self.recipe or recipe_for(self.model, self.settings.device)).max_length)
            except Exception:  # a retrain will say what is missing; serving must not wait for it
                log.exception("could not import ms-swift ahead of the first retrain")
        if self.settings.prepare_ahead and not stop.is_set():
            try:
                self.store.runs.runner_heartbeat(os.getpid())  # a retrain asked for meanwhile waits for this
                self.prepare_ahead()
            except Exception:  # the first retrain computes it then, and says what failed
                log.exception("could not prepare the first retrain ahead")
        try:
            while not stop.is_set():
                try:
                    self.store.runs.runner_heartbeat(os.getpid())  # lets a queued request say a runner will take it
                    self.request_if_due()
                    run = self.store.runs.claim_next()
                    if run is not None:
                        run_retrain(run, store=self.store, engine=self.engine, model=self.model,
                                    settings=self.settings, recipe=self.recipe, warm=warm)
                        if trainer == "worker":
                            warm.prepare()  # only now: a worker starting during training slows it
                        continue
                except Exception:
                    log.exception("retrain runner: unexpected error (it keeps running)")
                stop.wait(self.poll_s)
        finally:
            warm.close()

    def prepare_ahead(self) -> None:
        """Before anyone asks for a retrain, compute what the first one would otherwise wait for.

        1. The base's general answers (as served, for the dataset; as evaluated, where that differs) and
           the evaluations of the base and of the live adapter under the current profile. All are cached on
           disk (per model, profile and probe set), so a retrain then evaluates only its candidate. On an
           H200 with a 7B model that is ~4 s of the first retrain's dataset and ~18 s of its evaluation. Chats go on meanwhile: they share the engine's batches.
        2. When the engine lends its weights to a trainer in this process (on a GPU, by default): a
           throwaway training of two steps, and one answer from the adapter they made. CUDA loads kernels
           the first time each is used, and the first merge of a candidate keeps a host copy of the
           weights: the first retrain's steps took twice as long as the next one's (22 s against 10 s on
           an H200), and its evaluation 15 s against 6 s. The GPU recipe's layers compile here too (~75 s
           the first time on a machine). Chats are told to come back meanwhile.
        Off by default on a CPU (SELFCOG_PREPARE_AHEAD=on asks): there the evaluations are ~2 minutes of
        both cores, and a CPU has no kernels to load."""
        clock = time.perf_counter()
        replay = general_answers(self.engine, self.model, self.settings.cache_dir)
        evaluate_current(self.store, self.engine, self.model, self.settings.cache_dir)  # what `selfcog eval` computes
        log.info("the first retrain's references are ready (%.1f s)", time.perf_counter() - clock)
        if self.engine.trains_on_serving_weights and trains_in_process(self.settings, self.engine):
            self._warm_the_trainer(replay)

    def _warm_the_trainer(self, base_general: list[dict]) -> None:
        """Two training steps on the serving weights, on this store's dataset, and one answer from the
        adapter they made; nothing of it is kept."""
        clock = time.perf_counter()
        recipe = self.recipe or recipe_for(self.model, self.settings.device)
        dataset = build_run_dataset(self.store, base_general, recipe, seed=0)
        if not dataset.rows:
            return
        two_steps = 2 * recipe.batch_size * recipe.grad_accum / len(dataset.rows)  # of an epoch of shuffled rows
        recipe = replace(recipe, epochs=min(1.0, two_steps))
        folder = Path(self.settings.data_dir) / "runs" / "warm-up"  # the cache may be shared by other servers
        shutil.rmtree(folder, ignore_errors=True)
        try:
            path = dataset.write_swift(folder / "dataset.jsonl")
            # the GPU recipe's layers compile here: ~75 s the first time in a process on an H200
            with self.engine.pause_for_training(expected_s=75 if recipe.compiled_layers else 10, lend=True) as lent:
                adapter = train_adapter(self.model, path, folder / "train", recipe, trainer="in-process", lent=lent,
                                        device=self.engine.device)
            self.engine.generate([[{"role": "user", "content": "Who are you?"}]], adapter=adapter, max_new_tokens=1)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        log.info("the trainer is warm: two throwaway steps in %.1f s", time.perf_counter() - clock)

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
