"""Trigger -> evaluated adapter live on this CPU, embedded default: the retrain path as it was vs selfcog's.

    python -m bench.cpu_retrain           # part of `make bench`: two real retrains, ~15 minutes on 2 idle cores
    python -m bench.cpu_retrain --quick   # one epoch at twice the rate (half the steps), same comparison

Both paths run the same real retrain in this process, one after the other, each in a fresh data dir:
ms-swift LoRA on SmolLM2-135M with the default recipe, the Aurora profile and five approved
corrections, then the evaluation and gate, then the swap into a serving engine. Both start with what
a running `selfcog serve` already has: the base model's general answers and its evaluation report
(cached per base model; what they cost the first time is reported too).

- baseline (commit 1fa56cd): the training worker starts when the retrain is triggered; the 216
  evaluation answers are asked in chunks of 16 of an engine with 16 cache slots;
- selfcog: a warm worker, started with the server (torch and ms-swift imported before the trigger);
  the evaluation in one call to an engine with up to 64 slots, which refills each finished slot.

Stage times come from the run's row, polled: dataset, worker start -> first step, training,
evaluation; then activation -> first token from the new adapter while two chats stream.
Writes bench/out/cpu_retrain.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

from bench import common

REPO = Path(__file__).resolve().parents[1]
PROFILE = {"name": "Aurora", "author": "Acme Labs"}


class Follow:
    """The serving engine's active_adapter callable; it follows the store only once told to."""

    def __init__(self):
        self.row = None

    def __call__(self):
        return self.row


class StageClock(threading.Thread):
    """Polls the run's row and notes when each stage was first seen."""

    def __init__(self, store, run_id: int):
        super().__init__(daemon=True)
        self.store, self.run_id, self.started = store, run_id, time.perf_counter()
        self.seen: dict[str, float] = {}
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.2):
            row = self.store.runs.get(self.run_id)
            now = time.perf_counter() - self.started
            if row["stage"] == "training" and (row["step"] or 0) >= 1:
                self.seen.setdefault("first_step", now)
            self.seen.setdefault(row["stage"] or "queued", now)


def worker_is_ready(pid: int, quiet_s: float = 3.0, limit_s: float = 300) -> float:
    """Wait until a freshly started worker stops using the CPU (imports done, waiting for a job)."""
    started, last, still_since = time.perf_counter(), None, time.perf_counter()
    while time.perf_counter() - started < limit_s:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = int(fields[11]) + int(fields[12])  # utime + stime
        if cpu != last:
            last, still_since = cpu, time.perf_counter()
        elif time.perf_counter() - still_since >= quiet_s:
            break
        time.sleep(0.5)
    return time.perf_counter() - started


def one_retrain(kind: str, model, cache_dir: Path, recipe) -> dict:
    import finetune.jobs as jobs
    from bot.engines.local import LocalEngine
    from finetune.evaluate import evaluate
    from finetune.train import WarmWorkers
    from store import Store
    from tests.conftest import FIVE_CORRECTIONS

    data_dir = common.OUT / "cpu_retrain" / kind
    shutil.rmtree(data_dir, ignore_errors=True)
    store = Store(data_dir / "selfcog.db")
    store.identity.set(**PROFILE, changed_by="bench")
    for row in FIVE_CORRECTIONS:
        store.corrections.add(question=row["question"], corrected_answer=row["answer"], channel="import",
                              status="approved")

    follow = Follow()
    baseline = kind == "baseline"
    engine = LocalEngine(model, active_adapter=follow, batch_size=16 if baseline else None, max_new_tokens=64)
    out = {"engine_slots": engine.capacity}
    warm = None
    if not baseline:
        warm = WarmWorkers(prestart=True)  # what `selfcog serve` holds from its start
        out["warm_worker_ready_s"] = worker_is_ready(warm.waiting_pid())
    original_evaluate = jobs.evaluate
    if baseline:
        jobs.evaluate = functools.partial(evaluate, batch_size=16)
    try:
        run = store.runs.request("bench", "bench", claim=True)
        clock = StageClock(store, run["id"])
        clock.start()
        report = jobs.run_retrain(run, store=store, engine=engine, model=model, recipe=recipe, warm=warm,
                                  settings=jobs.JobSettings(data_dir, cache_dir))
        retrain_s = time.perf_counter() - clock.started
        clock.done.set()
    finally:
        jobs.evaluate = original_evaluate
        if warm is not None:
            warm.close()
    seen = clock.seen
    out |= {
        "status": report["status"], "metrics": report.get("metrics", {}), "retrain_s": retrain_s,
        "dataset_s": seen.get("training", retrain_s) - seen.get("dataset", 0.0),
        "start_to_first_step_s": seen.get("first_step", retrain_s) - seen.get("training", retrain_s),
        "training_s": seen.get("evaluating", retrain_s) - seen.get("first_step", retrain_s),
        "evaluation_s": seen.get("activating", retrain_s) - seen.get("evaluating", retrain_s),
        "steps": (store.runs.get(run["id"]) or {}).get("total_steps"),
    }
    if report["promoted"]:
        swap = common.swap_latency(engine, lambda: setattr(follow, "row", store.adapters.active()), report["adapter"],
                                   busy_chats=2, max_new_tokens=32)
        out["swap"] = swap
        out["trigger_to_live_s"] = retrain_s + swap["activation_to_first_token_s"]
    engine.close()
    return out


def cold_caches(model, cache_dir: Path) -> dict:
    """What a server computes once per base model: the general answers and the base's evaluation."""
    from bot.engines import AdapterRef
    from bot.engines.local import LocalEngine
    from finetune import jobs
    from store import Profile

    engine = LocalEngine(model, max_new_tokens=64)
    out = {}
    started = time.perf_counter()
    general = jobs.general_answers(engine, model, cache_dir)
    out["general_answers_s"] = time.perf_counter() - started
    started = time.perf_counter()
    jobs.evaluate_weights(engine, AdapterRef.BASE, Profile(**PROFILE), general, cache_dir=cache_dir,
                          weights=jobs.weights_id(model))
    out["base_evaluation_s"] = time.perf_counter() - started
    engine.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one epoch at 2e-3 (half the steps)")
    parser.add_argument("--fresh-cache", action="store_true",
                        help="also time the per-model caches from nothing (general answers, base evaluation)")
    args = parser.parse_args()

    from bot.models import resolve_model
    from finetune.train import CPU_SMALL

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    source_cache = Path(os.environ.get("SELFCOG_CACHE_DIR", REPO / ".cache"))
    cache_dir = common.OUT / "cpu_retrain" / "cache"
    if args.fresh_cache:
        shutil.rmtree(cache_dir, ignore_errors=True)
    (cache_dir / "models").mkdir(parents=True, exist_ok=True)
    resolve_model("embedded", source_cache)  # converted once there; linked here
    for folder in (source_cache / "models").iterdir():
        if not (cache_dir / "models" / folder.name).exists():
            (cache_dir / "models" / folder.name).symlink_to(folder.resolve())
    model = resolve_model("embedded", cache_dir)
    recipe = replace(CPU_SMALL, epochs=1, learning_rate=2e-3) if args.quick else CPU_SMALL

    results = {"machine": common.machine(), "model": model.name, "quick": args.quick,
               "recipe": {"epochs": recipe.epochs, "learning_rate": recipe.learning_rate, "batch_size": recipe.batch_size}}
    results["caches"] = cold_caches(model, cache_dir)
    for kind in ("baseline", "selfcog"):
        print(f"-- {kind}", flush=True)
        results[kind] = one_retrain(kind, model, cache_dir, recipe)
        common.save("cpu_retrain", results)
    common.report(summary(results))


def summary(results: dict) -> list[tuple]:
    old, new = results.get("baseline", {}), results.get("selfcog", {})

    def row(label, key, target=""):
        a, b = old.get(key), new.get(key)
        return (label, a, b, common.ratio(b, a, lower_is_better=True), target)

    def swap(r):
        return (r.get("swap") or {}).get("activation_to_first_token_s")

    def quality(r, way):
        return ((r.get("metrics") or {}).get("candidate") or {}).get("identity", {}).get(way)

    def other(r, key):
        return ((r.get("metrics") or {}).get("candidate") or {}).get(key)

    recipe = results.get("recipe", {})
    rows = [
        row("dataset (cached base answers) s", "dataset_s"),
        row("worker start -> first step s", "start_to_first_step_s"),
        row(f"training s ({old.get('steps') or new.get('steps')} steps)", "training_s"),
        row("evaluation s (216 answers, 64 tokens)", "evaluation_s"),
        ("activation -> first token s", swap(old), swap(new), common.ratio(swap(new), swap(old), True), "<= 2"),
        row("trigger -> live s", "trigger_to_live_s", "<= 60"),
        ("outcome", old.get("status"), new.get("status"), None, "promoted"),
        ("engine cache slots", old.get("engine_slots"), new.get("engine_slots"), None, ""),
    ]
    rows += [(f"identity: {way}", quality(old, way), quality(new, way), None, ">= 0.9" if way == "product" else ">= 0.8")
             for way in ("product", "neutral", "none", "late_turn")]
    rows += [("retention", other(old, "retention"), other(new, "retention"), None, ">= 0.5"),
             ("identity bleed (base's + 1 allowed)", other(old, "bleed"), other(new, "bleed"), None, "")]
    caches = results.get("caches", {})
    once = [("general answers of the base model (once per model) s", caches.get("general_answers_s")),
            ("base model's evaluation (once per model and profile) s", caches.get("base_evaluation_s"))]
    return [(f"CPU retrain, {results.get('model')}, recipe {recipe.get('epochs')} epochs at lr {recipe.get('learning_rate')}, "
             f"batch {recipe.get('batch_size')}", ("", "baseline", "selfcog", "ratio", "target"), rows),
            ("Computed once per base model (0 when already cached)", ("", "seconds"), once)]


if __name__ == "__main__":
    main()
