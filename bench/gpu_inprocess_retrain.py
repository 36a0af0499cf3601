"""Retrain on one GPU, Qwen2.5-7B shape (random weights): the worker process vs the in-process trainer, and a
24 GB card that serves and retrains at once.

    bash bench/run_gpu.sh gpu_inprocess_retrain              # carry .whl; ~6 minutes of an H200
    python -m bench.gpu_inprocess_retrain --parts cli serve24

cli: `selfcog retrain --json` (the real CLI, the product's GPU recipe, five approved corrections), twice
per trainer in a fresh data directory: the first pays for the base model's general answers and
evaluation (cached on disk after), the second is what a running server sees. SELFCOG_TRAINER=worker is
the path that landed before (a worker process loads a second copy of the weights); in-process trains on
the weights the CLI's engine already holds.

serve24: what `selfcog serve` runs (engine + job runner) with SELFCOG_GPU_MEMORY_GB=23 (torch's allocator
capped at 23 GiB, so the whole GPU, CUDA context included, stays within a 24 GiB card). A retrain is
queued as the admin button queues it (with --via-cli N, then N more by `selfcog retrain --json` in a
process of its own, which hands them to this server's runner); a chat is sent every 0.5 s throughout. Recorded: the run's phases,
what each chat got (an answer, or the "learning ... back in about N s" notice, or an error), and the
whole GPU's peak as nvidia-smi reads it (every 0.2 s).

Random weights teach nothing, so the gate here is opened (every threshold at its loosest): the adapter is
promoted and the swap is timed as part of trigger -> live. Writes bench/out/gpu_inprocess_retrain.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from bench import common
from bench.gpu_model import REPO, build
from bench.gpu_multi_retrain import seed_store
from bench.gpu_retrain import GpuMemory

OPEN_GATE = {"SELFCOG_GATE_PRODUCT": "0", "SELFCOG_GATE_OTHER": "0", "SELFCOG_GATE_RETENTION": "0",
             "SELFCOG_GATE_BLEED_SHARE": "1", "SELFCOG_GATE_FACTS_DROP": "1000"}


def cli_runs(model_dir: Path, trainer: str, out: Path) -> list[dict]:
    data_dir = out / f"cli-{trainer}"
    seed_store(data_dir)
    env = os.environ | OPEN_GATE | {
        "SELFCOG_DATA_DIR": str(data_dir), "SELFCOG_CACHE_DIR": str(data_dir / "cache"),
        "SELFCOG_MODEL": str(model_dir), "SELFCOG_TRAINER": trainer, "HF_HUB_OFFLINE": "1",
    }
    runs = []
    for attempt in ("first", "second"):
        with GpuMemory() as memory:
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "selfcog.cli", "retrain", "--json"], env=env, cwd=REPO,
                                  capture_output=True, text=True)
            wall = time.perf_counter() - started
        (out / f"cli-{trainer}-{attempt}.log").write_text(done.stdout + "\n" + done.stderr)
        try:
            report = json.loads(done.stdout[done.stdout.index("{"):])
        except (ValueError, IndexError):
            report = {"error": done.stderr[-3000:]}
        runs.append({"trainer": trainer, "attempt": attempt, "exit_code": done.returncode, "process_wall_s": round(wall, 1),
                     "seconds": report.get("seconds"), "phases": report.get("phases"), "status": report.get("status"),
                     "peak_gib": round(memory.peak_gib, 1), "error": report.get("error") or report.get("reason")})
        print(json.dumps(runs[-1]), flush=True)
    return runs


def _step_seconds(log: Path) -> list[float] | None:
    """Each training step's own seconds, from the trainer's logging.jsonl (None where the trainer wrote none)."""
    if not log.exists():
        return None
    return [line["step_s"] for line in map(json.loads, log.read_text().splitlines()) if "step_s" in line]


def serve24(model_dir: Path, out: Path, cap_gb: float = 23, compare: str | None = None, more: int = 0,
            prepare_ahead: bool = False, via_cli: int = 0) -> dict:
    if cap_gb:
        os.environ["SELFCOG_GPU_MEMORY_GB"] = str(cap_gb)
    from bot.engines import EngineError
    from bot.engines.local import LocalEngine
    from bot.models import resolve_model
    from finetune.evaluate import GateThresholds
    from finetune.jobs import JobRunner, JobSettings
    from finetune.train import recipe_for
    from store import Store

    data_dir = out / f"serve-cap{cap_gb:g}"
    seed_store(data_dir)
    store = Store(data_dir / "selfcog.db")
    model = resolve_model(str(model_dir), data_dir / "cache")
    result: dict = {"cap_gib": cap_gb}
    with GpuMemory() as memory:
        engine = LocalEngine(model, active_adapter=store.adapters.active, max_new_tokens=64,
                             train_weights=os.environ.get("SELFCOG_TRAIN_WEIGHTS", "auto"))
        recipe = recipe_for(model, engine.device)
        result |= {"engine_slots": engine.capacity, "trains_on_serving_weights": engine.trains_on_serving_weights,
                   "recipe": recipe.to_dict()}
        gate = GateThresholds(identity_product=0, identity_other=0, retention=0, bleed_share=1, facts_drop=1000,
                              identity_tolerance=1)
        runner = JobRunner(JobSettings(data_dir, data_dir / "cache", device=engine.device, gate=gate), store,
                           model=model, engine=engine, poll_s=0.2)
        stop, chats_done = threading.Event(), threading.Event()
        chats: list[dict] = []

        def chat_every_half_second():
            while not chats_done.is_set():
                t = time.perf_counter()
                try:
                    reply = engine.stream([{"role": "user", "content": "Who are you?"}], max_new_tokens=16)
                    text = "".join(reply)
                    chats.append({"at": t, "got": "answer", "s": round(time.perf_counter() - t, 2),
                                  "adapter": reply.adapter_version, "text": text[:40]})
                except EngineError as e:
                    chats.append({"at": t, "got": "notice", "text": str(e)})
                except Exception as e:  # what must never happen
                    chats.append({"at": t, "got": "error", "text": f"{type(e).__name__}: {e}"})
                chats_done.wait(0.5)

        chatter = threading.Thread(target=chat_every_half_second, daemon=True)
        chatter.start()
        if prepare_ahead:  # what `selfcog serve` does at start on a GPU (SELFCOG_PREPARE_AHEAD), timed here
            started = time.perf_counter()
            runner.prepare_ahead()
            result["prepare_ahead_s"] = round(time.perf_counter() - started, 1)
            print("prepared ahead in", result["prepare_ahead_s"], "s", flush=True)
        thread = runner.start(stop)
        time.sleep(3)
        # --compare FIELD: a boolean field of the recipe off and on, alternating, in the same process
        retrains = ([("first", None), ("second", None)] + [(f"more-{i}", None) for i in range(1, more + 1)]
                    if not compare else
                    [(attempt, i % 2 == 1) for i, attempt in enumerate(("first", "second", "third", "fourth", "fifth",
                                                                         "sixth"))])
        # --via-cli N: then N retrains through `selfcog retrain --json` in a process of its own, which finds
        # this runner alive and hands the retrain to it (what an admin's terminal beside `selfcog serve` does)
        retrains += [(f"selfcog retrain {i}", None) for i in range(1, via_cli + 1)]
        cli_env = os.environ | {"SELFCOG_DATA_DIR": str(data_dir), "SELFCOG_CACHE_DIR": str(data_dir / "cache"),
                                "SELFCOG_MODEL": str(model_dir), "HF_HUB_OFFLINE": "1"}
        for attempt, value in retrains:
            runner.recipe = recipe if value is None else replace(recipe, **{compare: value})
            started = time.perf_counter()
            if attempt.startswith("selfcog retrain"):
                done = subprocess.run([sys.executable, "-m", "selfcog.cli", "retrain", "--json"], env=cli_env,
                                      cwd=REPO, capture_output=True, text=True)
                process_s = round(time.perf_counter() - started, 1)
                (out / f"{attempt.replace(' ', '-')}.log").write_text(done.stdout + "\n" + done.stderr)
                run = store.runs.list(1)[0]  # the run the command queued (it waited for it to end)
                if done.returncode or run["trigger"] != "cli":
                    result[attempt] = {"exit_code": done.returncode, "error": done.stderr[-2000:]}
                    print(attempt, json.dumps(result[attempt]), flush=True)
                    continue
            else:
                process_s = None
                run = store.runs.request("admin", "bench")  # what the admin page's button does
            while (row := store.runs.get(run["id"]))["status"] in ("queued", "running"):
                time.sleep(0.2)
            result[attempt] = {"wall_s": round(time.perf_counter() - started, 1), "status": row["status"],
                               "process_s": process_s,
                               "pack_rows": runner.recipe.pack_rows,
                               "compared": {compare: value} if compare else None,
                               "phases": (row.get("report") or {}).get("phases"), "error": row.get("error"),
                               "training_split": (row.get("report") or {}).get("training_split"),
                               # the same rows in the same order every retrain: the curves compare a change
                               "losses": [point["loss"] for point in store.runs.losses(run["id"])],
                               "step_s": _step_seconds(data_dir / "runs" / str(run["id"]) / "train" / "logging.jsonl"),
                               "live_after": engine.adapter_version}
            print(attempt, json.dumps(result[attempt]), flush=True)
        time.sleep(3)
        chats_done.set()
        chatter.join()
        stop.set()
        thread.join()
    result["peak_gib_whole_gpu"], result["memory_sampler"] = round(memory.peak_gib, 2), memory.reader
    result["chats"] = {kind: sum(c["got"] == kind for c in chats) for kind in ("answer", "notice", "error")}
    result["chat_samples"] = [c for c in chats if c["got"] != "answer"][:3] + [c for c in chats if c["got"] == "answer"][-2:]
    import torch

    result["torch_max_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    engine.close()
    print("serve24", json.dumps({k: v for k, v in result.items() if k != "recipe"}), flush=True)
    return result


def summary(results: dict) -> list[tuple[str, tuple, list]]:
    tables = []
    cli = {(r["trainer"], r["attempt"]): r for r in results.get("cli", [])}
    if cli:
        def phase(r, name):
            return (r.get("phases") or {}).get(name)

        rows = []
        for trainer in ("worker", "in-process"):
            for attempt in ("first", "second"):
                r = cli.get((trainer, attempt))
                if r:
                    rows.append((f"{trainer}, {attempt} retrain", r["seconds"], phase(r, "dataset"), phase(r, "worker_start"),
                                 phase(r, "training"), phase(r, "evaluation"), phase(r, "swap"), r["peak_gib"], r["status"]))
        tables.append(("`selfcog retrain --json` on one GPU: worker process (before) vs in-process, Qwen2.5-7B shape, "
                       "random weights, gate opened", ("", "trigger -> live s", "dataset", "start", "training", "evaluation",
                                                       "swap", "whole-GPU peak GiB", "outcome"), rows))
    for key, title in (("serve_whole_gpu", "`selfcog serve` (engine + job runner), retrains queued as the admin button does, "
                                           "whole H200"),
                       ("serve24", "The same capped at 23 GiB (SELFCOG_GPU_MEMORY_GB=23): a 24 GiB card")):
        r = results.get(key)
        if not r:
            continue

        def label(run: dict) -> str:
            if run.get("process_s"):
                return f" (its process: {run['process_s']} s)"
            if "compared" in run:  # runs since --compare; before it, pack_rows said which batches ran
                return "".join(f" ({field} {value})" for field, value in (run["compared"] or {}).items())
            return {True: " (packed batches)", False: " (padded batches)", None: ""}[run.get("pack_rows")]

        def training(run: dict) -> str | None:
            seconds, split = (run["phases"] or {}).get("training"), run.get("training_split")
            return f"{seconds} ({split['steps']} + {split['after_steps']})" if split else seconds

        rows = [(attempt + label(run), run["wall_s"], *((run["phases"] or {}).get(phase) for phase in ("dataset", "worker_start")),
                 training(run), *((run["phases"] or {}).get(phase) for phase in ("evaluation", "swap")), run["status"])
                for attempt, run in r.items() if isinstance(run, dict) and "phases" in run]
        setup = "".join([f", {r['engine_slots']} cache slots" if "engine_slots" in r else "",
                         f", prepared ahead at start in {r['prepare_ahead_s']} s" if r.get("prepare_ahead_s") else ""])
        tables.append((f"{title}{setup}: whole-GPU peak {r['peak_gib_whole_gpu']} GiB ({r.get('memory_sampler', 'nvidia-smi')}), chats sent every 0.5 s: "
                       f"{r['chats']['answer']} answered, {r['chats']['notice']} told to come back, {r['chats']['error']} errors",
                       ("retrain", "trigger -> live s", "dataset", "start", "training (steps + after)", "evaluation", "swap",
                        "outcome"), rows))
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["cli", "serve24"], choices=["cli", "serve24"])
    parser.add_argument("--trainers", nargs="+", default=["worker", "in-process"])
    parser.add_argument("--cap-gb", type=float, default=23, help="serve24's memory cap (0: the whole GPU)")
    parser.add_argument("--via-cli", type=int, default=0,
                        help="serve24: then this many retrains through `selfcog retrain --json` in another process")
    parser.add_argument("--compare", choices=["pack_rows", "lora_in_base_dtype", "fused_kernels", "compiled_layers"],
                        help="serve24: six retrains with this recipe field off and on, alternating")
    parser.add_argument("--prepare-ahead", action="store_true",
                        help="serve24: the job runner's prepare_ahead (reference evaluations, a warm trainer) before the first retrain")
    parser.add_argument("--more", type=int, default=0, help="serve24: this many retrains after the second, as it")
    parser.add_argument("--model", type=Path, help="a model folder instead of the random Qwen2.5-7B shape (a smoke test)")
    args = parser.parse_args()
    for name in ("finetune", "bot"):  # the training's own timings (steps, save, weights lent and taken back)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    model_dir = args.model or build(REPO / ".cache" / "bench-qwen7b")
    out = common.OUT / "gpu_inprocess_retrain"
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": common.machine()}
    if "cli" in args.parts:
        results["cli"] = [r for trainer in args.trainers for r in cli_runs(model_dir, trainer, out)]
        common.save("gpu_inprocess_retrain", results)
    if "serve24" in args.parts:
        results["serve24" if args.cap_gb else "serve_whole_gpu"] = serve24(
            model_dir, out, args.cap_gb, args.compare, args.more, args.prepare_ahead, args.via_cli)
    print("wrote", common.save("gpu_inprocess_retrain" + ("" if args.cap_gb == 23 else f"_cap{args.cap_gb:g}"), results))


if __name__ == "__main__":
    main()
