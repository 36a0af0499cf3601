"""The GPU retrain path, Qwen2.5-7B shape: ms-swift through selfcog's train_adapter, seed recipe vs selfcog's, then eval and swap.

    bash bench/run_gpu.sh retrain        # on the GPU machine: installs ms-swift's wheels from .whl, then runs this
    python -m bench.gpu_retrain --seed-epochs 1 --recipes seed,selfcog,bs50

The workload is fixed for every recipe: 50 identity pairs from selfcog's own dataset builder (one
system-prompt condition each, no replay rows), so the recipes differ only in how they train. Each
recipe goes through ``finetune.train.train_adapter`` (the worker subprocess the product starts), and
reports wall time (process start to adapter on disk), training seconds (ms-swift's train_runtime) and
peak GPU memory (ms-swift's max reserved, and nvidia-smi's reading of the whole GPU). The seed recipe
(10 epochs of bs 1 x grad-accum 16) is run for --seed-epochs of its epochs and its training time
scaled to 10, to save device time; its wall adds the same fixed start cost.

Then, with the serving engine loaded once: evaluation of the new adapter (finetune.evaluate through
engine.generate, in chunks of 16 as before and in one call as evaluate() does now) and the swap (activation -> first token
from it, chats streaming meanwhile). Writes bench/out/gpu_retrain.json.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import threading
import time
from pathlib import Path

from bench import common
from bench.gpu_decode import Follow, eval_workload
from bench.gpu_model import REPO, build

PAIRS = 50


def recipes(model) -> dict:
    from finetune.train import Recipe, recipe_for

    return {
        # the seed recipe of FACTS.md / issue #9 (LoRA r=8 on every linear layer, bf16)
        "seed": Recipe(learning_rate=1e-4, epochs=10, batch_size=1, grad_accum=16, lora_rank=8, lora_alpha=32,
                       max_length=512, dtype="bfloat16", gradient_checkpointing=True),
        "selfcog": recipe_for(model, "cuda"),
        # one step per epoch: the whole 50-pair set in one batch, no gradient checkpointing
        "bs50": Recipe(learning_rate=1e-3, epochs=10, batch_size=50, grad_accum=1, lora_rank=16, lora_alpha=32,
                       max_length=512, dtype="bfloat16", gradient_checkpointing=False),
    }


def write_dataset(folder: Path) -> Path:
    from finetune.dataset import build_dataset
    from store.identity import Profile

    dataset = build_dataset(Profile("Aurora", "Acme Labs"), [], [], seed=0, max_templates=PAIRS,
                            conditions_per_question=1, multi_turn_share=0.0, replay_rows=0)
    return dataset.write_swift(folder / "dataset.jsonl")


class GpuMemory:
    """The whole GPU's memory in use (every process's, as nvidia-smi shows it), sampled every 0.2 s:
    .peak_gib (the largest of any GPU) and .peak_gib_per_gpu after the with-block.

    Read through NVML in this process where pynvml (nvidia-ml-py) is installed, else by running
    nvidia-smi, which starts a process and NVML afresh five times a second. Both read the same peak
    beside the same trainings, and neither moved their step times beyond the spread
    (bench/RESULTS.md, gpu_train_profile_fused_kernels); NVML is simply the lighter of the two."""

    def __init__(self, reader: str = "auto"):
        self.peak_gib, self.peak_gib_per_gpu, self._stop = 0.0, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._read = (_nvml_reader() if reader in ("auto", "nvml") else None) or _nvidia_smi
        self.reader = "nvml" if self._read is not _nvidia_smi else "nvidia-smi"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            try:
                used = self._read()
                self.peak_gib_per_gpu = [round(max(a, b), 1) for a, b in
                                         zip(used, self.peak_gib_per_gpu or [0.0] * len(used))]
                self.peak_gib = max(self.peak_gib, *used)
            except Exception:  # a failed read (nvidia-smi timed out, an NVML error): the next one counts
                pass
            self._stop.wait(0.2)


def _nvidia_smi() -> list[float]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=5).stdout
    return [float(x) / 1024 for x in out.split()]


def _nvml_reader():
    """GiB used on each GPU by NVML's v2 memory info (reserved memory left out, as nvidia-smi leaves it)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        version = getattr(pynvml, "nvmlMemory_v2", None)

        def read() -> list[float]:
            infos = [pynvml.nvmlDeviceGetMemoryInfo(h, version=version) if version else pynvml.nvmlDeviceGetMemoryInfo(h)
                     for h in handles]
            return [info.used / 2**30 for info in infos]
        read()
        return read
    except Exception:  # no pynvml, or no NVML driver
        return None


def train(model, dataset: Path, out: Path, recipe) -> dict:
    from finetune.train import train_adapter

    steps = []
    started = time.perf_counter()
    with GpuMemory() as gpu:
        adapter = train_adapter(model, dataset, out, recipe, on_progress=lambda step, total, loss, eta: steps.append(
            (time.perf_counter() - started, step, total, loss)))
    wall = time.perf_counter() - started
    log = (out / "worker.log").read_text(errors="replace")
    runtime = re.findall(r"'train_runtime': '?([\d.]+)", log)
    memory = [float(m) for m in re.findall(r"'memory\(GiB\)': '?([\d.]+)", log)]
    first_step = steps[0][0] if steps else None
    return {"adapter": str(adapter), "wall_s": wall, "train_runtime_s": float(runtime[-1]) if runtime else None,
            "start_to_first_step_s": first_step, "steps": steps[-1][2] if steps else None,
            "final_loss": steps[-1][3] if steps else None, "swift_peak_reserved_gib": max(memory) if memory else None,
            "nvidia_smi_peak_gib": gpu.peak_gib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / ".cache" / "bench-qwen7b"))
    parser.add_argument("--recipes", default="seed,selfcog,bs50")
    parser.add_argument("--seed-epochs", type=float, default=1.0, help="epochs of the seed recipe actually run")
    args = parser.parse_args()

    from dataclasses import asdict, replace

    from bot.models import resolve_model

    folder = build(args.model)
    model = resolve_model(str(folder), REPO / ".cache")
    work = common.OUT / "gpu_retrain"
    started = time.perf_counter()
    dataset = write_dataset(work)
    results = {"machine": common.machine(), "model": "Qwen2.5-7B shape, random weights, bf16",
               "workload": f"{PAIRS} identity pairs (finetune.dataset.build_dataset, 1 condition, no replay)",
               "dataset_build_s": time.perf_counter() - started, "recipes": {}}
    for name in args.recipes.split(","):
        recipe = recipes(model)[name]
        scale = 1.0
        if name == "seed" and args.seed_epochs < recipe.epochs:
            scale = recipe.epochs / args.seed_epochs
            recipe = replace(recipe, epochs=args.seed_epochs)
        print(f"[train] {name}: {recipe}", flush=True)
        try:
            result = train(model, dataset, work / name, recipe)
        except Exception as e:  # recorded; the other recipes still run
            result = {"error": repr(e)[-2000:]}
        result["recipe"] = asdict(recipe)
        if scale != 1.0 and "train_runtime_s" in result and result["train_runtime_s"]:
            result["scaled_from_epochs"] = args.seed_epochs
            result["train_runtime_s_full"] = result["train_runtime_s"] * scale
            result["wall_s_full"] = result["wall_s"] + result["train_runtime_s"] * (scale - 1)
        results["recipes"][name] = result
        print(f"[train] {name}: { {k: v for k, v in result.items() if k != 'recipe'} }", flush=True)
        common.save("gpu_retrain", results)

    trained = next((r["adapter"] for n, r in results["recipes"].items() if n != "seed" and "adapter" in r), None)
    if trained:
        results["serve"] = evaluate_and_swap(model, trained)
        serve = results["serve"]
        best = min((r for n, r in results["recipes"].items() if n != "seed" and "wall_s" in r), key=lambda r: r["wall_s"])
        results["trigger_to_live_s"] = (results["dataset_build_s"] + best["wall_s"] + serve["eval_one_call"]["seconds"]
                                        + (serve["swap"]["activation_to_first_token_s"] or 0))
    common.save("gpu_retrain", results)
    common.report(summary(results))


def evaluate_and_swap(model, adapter: str) -> dict:
    import torch

    from bot.engines.local import LocalEngine

    follow = Follow(None)
    started = time.perf_counter()
    engine = LocalEngine(model, active_adapter=follow, device="cuda", max_new_tokens=64)
    out = {"engine_load_s": time.perf_counter() - started}
    eval_workload(engine, adapter, chunk=None, limit=4)  # warm-up
    out["eval_chunks_of_16"] = eval_workload(engine, adapter, chunk=16)
    out["eval_one_call"] = eval_workload(engine, adapter, chunk=None)
    out["swap"] = common.swap_latency(engine, lambda: setattr(follow, "row", {"version": 7, "path": adapter}),
                                      version=7, busy_chats=4, max_new_tokens=128)
    out["serving_peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    engine.close()
    print(f"[serve] {out}", flush=True)
    return out


def summary(results: dict) -> list[tuple[str, tuple, list]]:
    """The tables RESULTS.md and the console show: (title, header, rows)."""
    rows = []
    seed = results["recipes"].get("seed", {})
    for name, r in results["recipes"].items():
        wall = r.get("wall_s_full", r.get("wall_s"))
        runtime = r.get("train_runtime_s_full", r.get("train_runtime_s"))
        rows.append((name, wall, runtime, r.get("steps"), r.get("start_to_first_step_s"), r.get("swift_peak_reserved_gib"),
                     r.get("nvidia_smi_peak_gib"),
                     common.ratio(runtime, seed.get("train_runtime_s_full", seed.get("train_runtime_s")), True)))
    tables = [("GPU training, 50 identity pairs, ms-swift through finetune.train.train_adapter",
               ("recipe", "wall s", "training s", "steps", "start->step s", "swift peak GiB", "GPU peak GiB",
                "training x seed"), rows)]
    serve = results.get("serve")
    if serve:
        tables.append(("GPU evaluation and swap of the trained adapter", ("", "seconds", "target"), [
            ("eval, in chunks of 16 (as before)", serve["eval_chunks_of_16"]["seconds"], "<= 5"),
            ("eval, all probes in one generate call", serve["eval_one_call"]["seconds"], "<= 5"),
            ("swap: activation -> first token", serve["swap"]["activation_to_first_token_s"], "<= 2"),
            ("trigger -> live: dataset + fastest training wall + eval (one call) + swap", results.get("trigger_to_live_s"),
             "<= 30"),
        ]))
    return tables


if __name__ == "__main__":
    main()
