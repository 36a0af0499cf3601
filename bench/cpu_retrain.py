"""Trigger -> evaluated adapter live on this CPU, embedded default: the worker (before) vs in process (now).

    python -m bench.cpu_retrain           # part of `make bench`: five real retrains, ~20 minutes on 2 idle cores
    python -m bench.cpu_retrain --quick   # one epoch at twice the rate (half the steps), same comparison
    python -m bench.cpu_retrain --only in-process

Every path runs the same real retrain in this process, one after the other, each in a fresh data dir:
ms-swift LoRA on SmolLM2-135M, the Aurora profile and five approved corrections, then the evaluation and
gate, then the swap into the serving engine. Each starts with what a running `selfcog serve` already has:
the base model's general answers and its evaluation report (cached per base model and precision; what
they cost the first time is reported too).

- worker (what landed before): a warm worker process runs `swift sft` (padded random batches) at the
  rate of then, 1e-3; the engine and training compute in fp32;
- in-process (what `auto` does on a CPU without bf16 instructions): ms-swift's trainer in the serving
  process on its own copy of the weights, each batch's rows packed, the recipe's 1.5e-3, fp32;
- in-process-bf16-training: the same with bf16 autocast in training, the engine serving and evaluating in
  fp32: what `auto` did on a CPU with bf16 instructions (avx512_bf16, amx_bf16) until 2026-12-01;
- in-process-bf16-eval: the same, the evaluation's matrix products in bf16 (the engine still serves fp32):
  what `auto` does there now;
- in-process-bf16: bf16 autocast in training and a bf16 engine (an option, not the default).
RECIPES.md ("In-process training") has the seeds behind the choice.

Phase times are the run report's (dataset, worker start, training, evaluation, swap); trigger -> live is
the wall time of the whole retrain, the swap included. Writes bench/out/cpu_retrain.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import shutil
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path

from bench import common

REPO = Path(__file__).resolve().parents[1]
PROFILE = {"name": "Aurora", "author": "Acme Labs"}


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


class Chats(threading.Thread):
    """A user chatting meanwhile: a short greedy reply every ``every_s`` seconds, each noted with the stage
    the retrain was in when it was asked (what a chat costs the retrain, and the retrain the chat)."""

    def __init__(self, engine, clock: StageClock, every_s: float):
        super().__init__(daemon=True)
        self.engine, self.clock, self.every_s = engine, clock, every_s
        self.replies: list[dict] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(self.every_s):
            stage = max(self.clock.seen, key=self.clock.seen.get, default="queued")
            try:
                reply = self.engine.stream([{"role": "user", "content": "Name three colours."}], max_new_tokens=16)
                text = "".join(reply)
                self.replies.append({"stage": stage, "first_token_s": round(reply.first_token_s or 0, 3),
                                     "seconds": round(reply.seconds or 0, 3), "tokens": reply.completion_tokens,
                                     "ok": bool(text.strip()) and reply.error is None})
            except Exception as e:  # noqa: BLE001 (a chat refused or failed is what this counts)
                self.replies.append({"stage": stage, "error": repr(e)})

    def summary(self) -> dict:
        by_stage: dict[str, dict] = {}
        for stage in dict.fromkeys(r["stage"] for r in self.replies):
            mine = [r for r in self.replies if r["stage"] == stage]
            done = [r for r in mine if r.get("ok")]
            median = (lambda key: statistics.median(r[key] for r in done)) if done else (lambda key: None)
            by_stage[stage] = {"chats": len(mine), "answered": len(done),
                               "first_token_s_median": median("first_token_s"), "reply_s_median": median("seconds")}
        return by_stage


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


PATHS = {
    # what landed before issue 14: a warm worker process (ms-swift's `swift sft`, padded random batches),
    # the recipe's rate then (1e-3), every model computation in fp32
    "worker": {"trainer": "worker", "engine_dtype": "fp32", "train_dtype": "float32", "learning_rate": 1e-3,
               "eval_dtype": "fp32",
               "label": "worker, padded, lr 1e-3, fp32 (before)"},
    # the default now on CPUs without bf16 instructions: ms-swift's trainer in the serving process on a copy of the weights, each batch's rows
    # packed, the recipe's rate (1.5e-3), fp32; the engine decodes up to 256 replies at once
    "in-process": {"trainer": "in-process", "engine_dtype": "fp32", "train_dtype": "float32", "eval_dtype": "fp32",
                   "label": "in process, packed, fp32 (now, CPUs without bf16)"},
    # the same with the engine's slots of before (64): what the evaluation gains from 256
    "in-process-64-slots": {"trainer": "in-process", "engine_dtype": "fp32", "train_dtype": "float32", "slots": 64,
                            "eval_dtype": "fp32",
                            "label": "in process, packed, fp32, 64 slots"},
    # the same with bf16 autocast in training only (the fp32 weights' matmuls in bf16; LoRA, norms, loss and the
    # optimizer in fp32) and the engine in fp32, as it writes the replay rows and evaluates
    "in-process-bf16-training": {"trainer": "in-process", "engine_dtype": "fp32", "train_dtype": "bfloat16",
                                 "eval_dtype": "fp32",
                                 "label": "in process, packed, bf16 training, fp32 evaluation (before, CPUs with bf16)"},
    # the same with the evaluation's matrix products in bf16 too (SELFCOG_EVAL_DTYPE's auto there); the engine
    # still serves chats and writes the replay rows in fp32
    "in-process-bf16-eval": {"trainer": "in-process", "engine_dtype": "fp32", "train_dtype": "bfloat16",
                             "eval_dtype": "bf16",
                             "label": "in process, packed, bf16 training and evaluation (now, CPUs with bf16)"},
    # the same with bf16 autocast in training and a bf16 engine (SELFCOG_DTYPE=bf16,
    # SELFCOG_TRAIN_DTYPE=bfloat16) where the CPU has bf16 instructions: faster, quality unmeasured over seeds
    "in-process-bf16": {"trainer": "in-process", "engine_dtype": "bf16", "train_dtype": "bfloat16", "eval_dtype": "bf16",
                        "label": "in process, packed, bf16"},
}


def one_retrain(kind: str, model, cache_dir: Path, recipe, chat_every_s: float | None = None) -> dict:
    import finetune.jobs as jobs
    from bot.engines.local import LocalEngine
    from bot.hardware import cpu_has_fast_bf16
    from finetune.in_process import warm_up
    from finetune.train import WarmWorkers, cpu_dtype

    path = PATHS[kind]
    recipe = replace(recipe, dtype=path["train_dtype"] or cpu_dtype(),
                     learning_rate=path.get("learning_rate", recipe.learning_rate))
    data_dir = common.OUT / "cpu_retrain" / kind
    store = common.five_correction_store(data_dir)

    engine = LocalEngine(model, active_adapter=store.adapters.active, max_new_tokens=64, dtype=path["engine_dtype"],
                         batch_size=path.get("slots"), eval_dtype=path["eval_dtype"])
    out = {"engine_slots": engine.capacity, "engine_dtype": engine.precision, "eval_dtype": engine.eval_precision,
           "train_dtype": recipe.dtype,
           "date": common.machine()["date"], "cpu_has_bf16": cpu_has_fast_bf16()}
    out["caches"] = cold_caches(engine, model, cache_dir)  # what a running server has computed once already
    cached = set((cache_dir / "eval").glob("*.json"))  # the candidate's evaluation is removed after the run
    warm = None
    if path["trainer"] == "worker":
        warm = WarmWorkers(prestart=True)  # what `selfcog serve` holds from its start
        out["warm_worker_ready_s"] = worker_is_ready(warm.waiting_pid())
    else:
        warm_up(model, recipe.max_length)  # what `selfcog serve`'s job runner does at its start
    try:
        run = store.runs.request("bench", "bench", claim=True)
        clock = StageClock(store, run["id"])
        clock.start()
        chats = Chats(engine, clock, chat_every_s) if chat_every_s else None
        if chats:
            chats.start()
        used = resource.getrusage(resource.RUSAGE_SELF)
        report = jobs.run_retrain(run, store=store, engine=engine, model=model, recipe=recipe, warm=warm,
                                  settings=jobs.JobSettings(data_dir, cache_dir, trainer=path["trainer"]))
        retrain_s = time.perf_counter() - clock.started
        after = resource.getrusage(resource.RUSAGE_SELF)  # this process's (the worker's is apart)
        out |= {"system_cpu_s": round(after.ru_stime - used.ru_stime, 1),
                "page_faults": after.ru_minflt - used.ru_minflt + after.ru_majflt - used.ru_majflt}
        clock.done.set()
        if chats:
            chats.done.set()
            chats.join()
    finally:
        if warm is not None:
            warm.close()
        for made in set((cache_dir / "eval").glob("*.json")) - cached:  # two paths may train the same adapter,
            made.unlink()  # and each must evaluate it
    out["phases"] = report.get("phases")
    if chats:
        out["chats_meanwhile"] = {"every_s": chat_every_s, "by_stage": chats.summary()}
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
        reply = engine.stream([{"role": "user", "content": "Who are you?"}], max_new_tokens=24)
        out["answer_after"] = "".join(reply)
        out["answer_adapter"] = reply.adapter_version
    out["memory_gb"] = process_memory_gb()  # after the retrain, the server idle again
    engine.close()
    return out


def process_memory_gb() -> dict:
    """This process's resident memory now and at its peak (Linux /proc), in GB."""
    status = Path("/proc/self/status")
    if not status.exists():
        return {}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return {name: round(int(fields[key].split()[0]) / 2**20, 2) for name, key in (("now", "VmRSS"), ("peak", "VmHWM"))}


def cold_caches(engine, model, cache_dir: Path) -> dict:
    """What a server computes once per base model (and precision): the general answers and the base's evaluation."""
    from bot.engines import AdapterRef
    from finetune import jobs
    from store import Profile

    out = {}
    started = time.perf_counter()
    jobs.general_answers(engine, model, cache_dir)  # the replay rows
    general = jobs.general_answers(engine, model, cache_dir, evaluation=True)  # the same where it evaluates as it serves
    out["general_answers_s"] = time.perf_counter() - started
    started = time.perf_counter()
    jobs.evaluate_weights(engine, AdapterRef.BASE, Profile(**PROFILE), general, cache_dir=cache_dir,
                          weights=jobs.weights_id(model))
    out["base_evaluation_s"] = time.perf_counter() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one epoch at 2e-3 (half the steps)")
    parser.add_argument("--only", nargs="+", choices=list(PATHS), help="run only these paths")
    parser.add_argument("--chat-every", type=float, metavar="S",
                        help="a short chat every S seconds during each retrain (its first-token times by stage)")
    parser.add_argument("--as", dest="save_as", metavar="LABEL",
                        help="a variant (e.g. under another environment): store the run as a column headed LABEL")
    parser.add_argument("--fresh-cache", action="store_true",
                        help="also time the per-model caches from nothing (general answers, base evaluation)")
    args = parser.parse_args()

    import bot.engines.local  # noqa: F401  (first: its OpenMP setting, before torch loads)
    from bot.models import resolve_model
    from finetune.train import CPU_SMALL

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

    results = common.load("cpu_retrain") if args.only and (common.OUT / "cpu_retrain.json").exists() else {}
    results |= {"machine": common.machine(), "model": model.name, "quick": args.quick,
               "recipe": {"epochs": recipe.epochs, "learning_rate": recipe.learning_rate, "batch_size": recipe.batch_size}}
    kinds = args.only or list(PATHS)
    for kind in kinds:
        print(f"-- {kind}", flush=True)
        run = one_retrain(kind, model, cache_dir, recipe, args.chat_every)
        if args.save_as:
            results.setdefault("also", {})[args.save_as] = run
        else:
            results[kind] = run
        common.save("cpu_retrain", results)
    common.report(summary(results))


def summary(results: dict) -> list[tuple]:
    kinds = [kind for kind in PATHS if kind in results]
    runs = [results[kind] for kind in kinds]
    # more columns, {label: run}: runs under `--as LABEL`, and runs of an earlier commit in the same sitting
    also = results.get("also") or {}
    labels = [PATHS[kind]["label"] for kind in kinds] + list(also)
    runs += list(also.values())
    # "now" is what `auto` does on the machine that ran it: bf16 training and evaluation where the CPU has bf16
    bf16_default = any(results.get(kind, {}).get("cpu_has_bf16") for kind in kinds)
    now_kind = "in-process-bf16-eval" if bf16_default else "in-process"
    before, now = results.get("worker", {}), results.get(now_kind, {})

    def phase(r, name):
        return (r.get("phases") or {}).get(name)

    def row(label, name, target=""):
        return (label, *(phase(r, name) for r in runs),
                common.ratio(phase(now, name), phase(before, name), lower_is_better=True), target)

    def candidate(r, key, way=None):
        value = ((r.get("metrics") or {}).get("candidate") or {}).get(key)
        return value.get(way) if way and isinstance(value, dict) else value

    recipe = results.get("recipe", {})
    rows = [
        row("dataset s (base answers cached)", "dataset"),
        row("worker start s", "worker_start"),
        row("training s (42 steps)", "training"),
        row("evaluation s (260 answers, 64 tokens)", "evaluation"),
        row("swap s", "swap"),
        ("trigger -> live s", *(r.get("retrain_s") for r in runs),
         common.ratio(now.get("retrain_s"), before.get("retrain_s"), True), "<= 120"),
        ("outcome", *(r.get("status") for r in runs), None, "promoted"),
        ("engine / evaluation / training dtype",
         *(f"{r.get('engine_dtype')} / {r.get('eval_dtype', r.get('engine_dtype'))} / {r.get('train_dtype')}"
           for r in runs), None, ""),
        ("engine slots", *(r.get("engine_slots") for r in runs), None, ""),
        ("memory GB after / at peak, this process",
         *(f"{r['memory_gb']['now']} / {r['memory_gb']['peak']}" if r.get("memory_gb") else None for r in runs), None, ""),
        ("system CPU s / page faults (millions), this process",
         *(f"{r['system_cpu_s']} / {r['page_faults'] / 1e6:.1f}" if "page_faults" in r else None for r in runs), None, ""),
        ("run at", *(r.get("date") for r in runs), None, ""),
    ]
    rows += [(f"identity: {way}", *(candidate(r, "identity", way) for r in runs), None,
              ">= 0.9" if way == "product" else ">= 0.8") for way in ("product", "neutral", "none", "late_turn")]
    rows += [("retention", *(candidate(r, "retention") for r in runs), None, ">= 0.45"),
             ("identity bleed of 132 answers", *(candidate(r, "bleed") for r in runs), None, ""),
             ("checkable facts kept", *("{}/{}".format(*candidate(r, "facts")) if candidate(r, "facts") else None
                                        for r in runs), None, ">= base's - 2")]
    stage_names = {"training": "training, before its first step", "first_step": "training, its steps",
                   "evaluating": "evaluation (a chat waits for the candidate's 260 answers)"}
    chats = [(label, stage_names.get(stage, stage), f"{v['answered']}/{v['chats']}", v["first_token_s_median"],
              v["reply_s_median"])
             for label, r in zip(labels, runs) if r.get("chats_meanwhile")
             for stage, v in r["chats_meanwhile"]["by_stage"].items()]
    once = [(f"{kind}: {what}", (results.get(kind, {}).get("caches") or {}).get(key))
            for kind in kinds
            for what, key in (("general answers of the base model s", "general_answers_s"),
                              ("the base model's evaluation s", "base_evaluation_s"))]
    return [(f"CPU retrain, {results.get('model')}, {recipe.get('epochs')} epochs, batch {recipe.get('batch_size')}, "
             f"dataset seed 1 (the suite's), one run",
             ("", *labels, "ratio now/before", "target"),
             rows),
            ("Computed once per base model and precision, before the trigger (0 when cached)", ("", "seconds"), once)
            ] + ([("A chat (16 tokens, greedy) asked every few seconds during the retrain, by the stage it was asked in",
                   ("run", "stage", "answered", "first token s (median)", "reply s (median)"), chats)] if chats else [])


if __name__ == "__main__":
    main()
