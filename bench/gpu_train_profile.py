"""Where a GPU retrain's training steps go: torch.profiler around the in-process trainer.

    bash bench/run_gpu.sh gpu_train_profile          # carry .whl; ~2 minutes of an H200
    python -m bench.gpu_train_profile --model .cache/models/SmolLM2-135M-Instruct --device cpu --epochs 0.1
    bash bench/run_gpu.sh gpu_train_profile --compare fused_kernels --rounds 3   # an A/B instead of a profile

The product's GPU recipe (``recipe_for``) on a Qwen2.5-7B-shaped model with random weights, trained by
``finetune.in_process.train_here`` on the five-correction dataset (the replay rows are the general
prompts with a stand-in answer of ~60 tokens: their lengths are what matters here). One training warms
up (CUDA loads its kernels on first use), the second runs under the profiler, both on one copy of the
weights lent as the serving engine lends its own. Written to
bench/out/gpu_train_profile.json: the wall time of the steps, the time the GPU spent in kernels, and the
operators that took the most GPU and CPU time.

--compare FIELD trains the same rows from the same initial adapter with a boolean field of the recipe off
and on, alternating, --rounds times each, without the profiler: the steps' seconds side by side and the
two loss curves (a change that only fuses kernels must leave them alike). Written to
bench/out/gpu_train_profile_FIELD.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from bench import common
from bench.gpu_model import REPO, build
from bench.gpu_multi_retrain import seed_store
from bench.gpu_retrain import GpuMemory

STAND_IN_ANSWER = ("Here is a short answer with a few plain sentences. It explains the idea, gives one example "
                   "and ends with a summary, as general answers of a small model do. ") * 2


def _device_seconds(event) -> float:
    microseconds = getattr(event, "self_device_time_total", None)
    if microseconds is None:  # older torch
        microseconds = getattr(event, "self_cuda_time_total", 0)
    return microseconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a model folder instead of the random Qwen2.5-7B shape")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=float, help="train this many epochs instead of the recipe's")
    parser.add_argument("--compare", choices=["fused_kernels", "lora_in_base_dtype", "pack_rows", "compiled_layers",
                                                  "one_packed_row"],
                        help="train with this recipe field off and on, alternating (no profiler)")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: trainings of each variant")
    parser.add_argument("--memory-sampler", choices=["none", "nvml", "nvidia-smi"], default="none",
                        help="--compare: sample the whole GPU's memory meanwhile, as the retrain benches do")
    args = parser.parse_args()
    model_dir = args.model or build(REPO / ".cache" / "bench-qwen7b")

    import torch
    from torch.profiler import ProfilerActivity, profile

    from bot.models import resolve_model
    from finetune.evaluate import load_general_prompts
    from finetune.in_process import train_here
    from finetune.jobs import build_run_dataset
    from finetune.train import recipe_for
    from store import Store

    out = common.OUT / "gpu_train_profile"
    data_dir = out / "data"
    seed_store(data_dir)
    store = Store(data_dir / "selfcog.db")
    model = resolve_model(str(model_dir), data_dir / "cache")
    recipe = recipe_for(model, args.device)
    if args.epochs:
        recipe = replace(recipe, epochs=args.epochs)
    general = [dict(prompt, answer=STAND_IN_ANSWER) for prompt in load_general_prompts()]
    dataset_path = build_run_dataset(store, general, recipe, seed=1).write_swift(out / "dataset.jsonl")

    on_gpu = args.device.startswith("cuda")
    # The weights are loaded once and lent to each training as the serving engine lends its own
    # (bot/engines/weights.py), so the profile holds the training, not a load of the weights.
    from transformers import AutoModelForCausalLM

    from bot.engines import LentWeights
    from bot.engines.weights import AdapterWeights

    dtype = torch.bfloat16 if on_gpu else torch.float32
    weights = AdapterWeights(AutoModelForCausalLM.from_pretrained(model.path, dtype=dtype).to(args.device),
                             model.path)

    def train(folder: str, recipe=recipe) -> float:
        shutil.rmtree(out / folder, ignore_errors=True)  # train_here appends to its logging.jsonl
        weights.lend()
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        train_here(model, dataset_path, out / folder, recipe, device=args.device,
                   lent=LentWeights(add_adapter=weights.add_training_adapter, device=args.device))
        if on_gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        weights.take_back()
        return seconds

    def logged_steps(folder: str) -> list[dict]:
        lines = [json.loads(line) for line in (out / folder / "logging.jsonl").read_text().splitlines()]
        return [line for line in lines if "loss" in line]

    warm_s = train("warm")
    if args.compare:
        runs = []
        sampler = GpuMemory(args.memory_sampler) if args.memory_sampler != "none" else contextlib.nullcontext()
        with sampler:
            for round_ in range(1, args.rounds + 1):
                for value in (False, True):
                    folder = f"{args.compare}-{value}-{round_}"
                    seconds = train(folder, replace(recipe, **{args.compare: value}))
                    steps = logged_steps(folder)
                    runs.append({args.compare: value, "round": round_, "call_s": round(seconds, 2),
                                 # train_speed(s/it) is the mean since the first step began: x steps = the steps' time
                                 "steps_s": round(steps[-1]["train_speed(s/it)"] * len(steps), 2), "steps": len(steps),
                                 "losses": [line["loss"] for line in steps],
                                 "step_s": [line.get("step_s") for line in steps],  # each step's own seconds
                                 "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if on_gpu else None})
                    print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("losses", "step_s")}),
                          "median step s", sorted(runs[-1]["step_s"])[len(steps) // 2], flush=True)
        result = {"machine": common.machine(), "recipe": recipe.to_dict(), "compare": args.compare,
                  "rows": sum(1 for _ in open(dataset_path, encoding="utf-8")), "warm_training_s": round(warm_s, 1),
                  "memory_sampler": getattr(sampler, "reader", None),
                  "whole_gpu_peak_gib": round(sampler.peak_gib, 2) if isinstance(sampler, GpuMemory) else None,
                  "runs": runs}
        suffix = "_" + sampler.reader.replace("-", "_") if isinstance(sampler, GpuMemory) else ""
        print("wrote", common.save(f"gpu_train_profile_{args.compare}{suffix}", result))
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as profiler:
        profiled_s = train("profiled")
    events = profiler.key_averages()
    kernel_s = sum(_device_seconds(e) for e in events if e.device_type.name == "CUDA") if on_gpu else None
    steps = [json.loads(line) for line in (out / "profiled" / "logging.jsonl").read_text().splitlines()]
    steps = [line for line in steps if "loss" in line]
    result = {
        "machine": common.machine(),
        "recipe": recipe.to_dict(),
        "rows": sum(1 for _ in open(dataset_path, encoding="utf-8")),
        "steps": len(steps),
        "warm_training_s": round(warm_s, 1),
        "profiled_training_s": round(profiled_s, 1),
        "gpu_kernel_s": round(kernel_s, 2) if kernel_s is not None else None,
        "by_gpu_time": events.table(sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total",
                                    row_limit=30, max_name_column_width=60),
        "by_cpu_time": events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60),
    }
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("by_")}, indent=1))
    print(result["by_gpu_time"])
    print(result["by_cpu_time"])
    print("wrote", common.save("gpu_train_profile", result))


def summary(results: dict) -> list[tuple[str, tuple, list]]:
    """--compare runs: seconds and loss curves by variant (a profile's JSON is summarised by hand).

    ``also``: more such runs of the same comparison (other samplers), a row per variant each."""
    field = results.get("compare")
    if not field:
        return []
    groups = [results] + list(results.get("also") or [])
    rows, gaps = [], []
    for group in groups:
        runs, where = group["runs"], f", {group['memory_sampler']} sampling" if group.get("memory_sampler") else ""
        for value in (False, True):
            mine = [r for r in runs if r[field] is value]
            if mine:
                steps = sorted(r["steps_s"] for r in mine)
                rows.append((f"{field} {value}{where}", len(mine), mine[0]["steps"], f"{steps[0]}-{steps[-1]}",
                             f"{min(r['call_s'] for r in mine)}-{max(r['call_s'] for r in mine)}",
                             f"{mine[0]['losses'][0]:.3f} -> {mine[0]['losses'][-1]:.3f}",
                             max(r["peak_gib"] or 0 for r in mine)))
        off, on = ([r for r in runs if r[field] is value] for value in (False, True))
        gaps += [abs(a - b) for x, y in zip(off, on) for a, b in zip(x["losses"], y["losses"])]
    return [(f"The same {results['rows']} rows trained from the same initial adapter, {field} off and on alternating "
             f"in one process (weights lent as serving lends them); largest loss gap at any step between paired "
             f"trainings: {round(max(gaps), 4) if gaps else None}",
             ("variant", "trainings", "steps", "steps s (min-max)", "train_here call s", "loss first -> last",
              "peak GiB (training)"), rows)]

if __name__ == "__main__":
    main()
