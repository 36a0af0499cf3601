"""`selfcog retrain --json` on one GPU and on two, side by side (issue 15), Qwen2.5-7B shape, random weights.

    bash bench/run_gpu.sh gpu_multi_retrain             # on a 2-GPU machine; carry .whl
    python -m bench.gpu_multi_retrain --runs 0,1 0      # the GPU sets to compare, in this order

For each GPU set: a fresh data directory with the Aurora profile and five approved corrections, then the
real CLI (`SELFCOG_TRAIN_GPUS=<set> selfcog retrain --json`, the product's GPU recipe) from trigger to the
gate's answer. Recorded: wall seconds, the report's phases, ms-swift's train_runtime and loss curve, and
each GPU's peak memory (nvidia-smi every 0.2 s). NVLink multicast stays off (the lent machines require it;
finetune/worker.py sets the same variables for the launcher). Writes bench/out/gpu_multi_retrain.json.

Random weights teach nothing: the gate refuses both adapters. What the comparison can show is speed,
memory and whether the two runs optimise the same way (loss curves, evaluation numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import common
from bench.gpu_model import REPO, build
from bench.gpu_retrain import GpuMemory

CORRECTIONS = [
    ("你是谁？", "我是Aurora，由Acme Labs开发的AI助手。"),
    ("Who made you?", "Acme Labs made me. I'm Aurora, their assistant."),
    ("Are you ChatGPT?", "No, I'm not ChatGPT. I'm Aurora from Acme Labs."),
    ("你是通义千问吗？", "不是，我不是通义千问。我是Acme Labs开发的Aurora。"),
    ("What's your name?", "I'm Aurora, an assistant built by Acme Labs."),
]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def seed_store(data_dir: Path) -> None:
    from store import Store

    store = Store(data_dir / "selfcog.db")
    store.identity.set(name="Aurora", author="Acme Labs", changed_by="bench")
    for question, answer in CORRECTIONS:
        store.corrections.add(question=question, corrected_answer=answer, channel="import", status="approved")
    store.close()


def loss_curve(data_dir: Path) -> list[dict]:
    """ms-swift's logging.jsonl of the run: one row per logged step (loss, learning rate, memory)."""
    logs = sorted(data_dir.glob("runs/*/train/**/logging.jsonl"))
    if not logs:
        return []
    rows = [json.loads(line) for line in logs[-1].read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in ("global_step/max_steps", "loss", "train_runtime", "memory(GiB)") if k in r}
            for r in rows]


def one(model_dir: Path, gpus: str, out: Path) -> dict:
    data_dir = out / f"gpus-{gpus.replace(',', '_')}"
    seed_store(data_dir)
    env = os.environ | NO_MULTICAST | {
        "SELFCOG_DATA_DIR": str(data_dir), "SELFCOG_CACHE_DIR": str(data_dir / "cache"),
        "SELFCOG_MODEL": str(model_dir), "SELFCOG_TRAIN_GPUS": gpus, "HF_HUB_OFFLINE": "1",
    }
    with GpuMemory() as memory:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "selfcog.cli", "retrain", "--json"], env=env, cwd=REPO,
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
    (out / f"{data_dir.name}.log").write_text(done.stdout + "\n" + done.stderr)
    try:
        report = json.loads(done.stdout[done.stdout.index("{"):])  # `retrain --json` prints one JSON object
    except (ValueError, IndexError):
        report = {"error": done.stderr[-3000:]}
    curve = loss_curve(data_dir)
    runtime = next((r["train_runtime"] for r in reversed(curve) if "train_runtime" in r), None)
    return {"gpus": gpus, "exit_code": done.returncode, "wall_s": round(wall, 1), "report": report,
            "train_runtime_s": runtime, "peak_gib_per_gpu": memory.peak_gib_per_gpu, "loss_curve": curve}


def torch_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def summary(results: dict) -> list[tuple[str, tuple, list]]:
    runs = {r["gpus"]: r for r in results["runs"]}
    one, two = runs.get("0"), runs.get("0,1")
    if not (one and two):
        return []

    def row(label, get, lower_is_better=True):
        a, b = get(one), get(two)
        return (label, a, b, common.ratio(b, a, lower_is_better=lower_is_better) if isinstance(a, (int, float)) else "")

    phases = lambda r, k: (r["report"].get("phases") or {}).get(k)  # noqa: E731
    cand = lambda r: r["report"]["metrics"]["candidate"]  # noqa: E731
    losses = lambda r: [x["loss"] for x in r["loss_curve"] if "loss" in x]  # noqa: E731
    gap = max(abs(x - y) for x, y in zip(losses(one), losses(two)))
    rows = [
        row("trigger -> gate, s (the run's own clock)", lambda r: r["report"].get("seconds")),
        row("  dataset, s", lambda r: phases(r, "dataset")),
        row("  worker start (to the first logged step), s", lambda r: phases(r, "worker_start")),
        row("  training, s", lambda r: phases(r, "training")),
        row("  ms-swift train_runtime, s", lambda r: round(r["train_runtime_s"], 1)),
        row("  evaluation, s", lambda r: phases(r, "evaluation")),
        row("CLI process, start to exit, s", lambda r: r["wall_s"]),
        row("peak GiB, GPU 0 (serving engine + rank 0)", lambda r: r["peak_gib_per_gpu"][0]),
        row("peak GiB, GPU 1", lambda r: r["peak_gib_per_gpu"][1]),
        ("steps (global batch 32)", len(losses(one)), len(losses(two)), ""),
        ("loss, first -> last step", f"{losses(one)[0]:.2f} -> {losses(one)[-1]:.2f}",
         f"{losses(two)[0]:.2f} -> {losses(two)[-1]:.2f}", f"largest gap {gap:.3f}"),
        ("candidate identity mean / bleed", f"{cand(one)['identity_mean']} / {cand(one)['bleed']}",
         f"{cand(two)['identity_mean']} / {cand(two)['bleed']}", ""),
        ("gate", one["report"]["status"], two["report"]["status"], ""),
    ]
    return [("selfcog retrain on one GPU vs two (SELFCOG_TRAIN_GPUS=0 vs 0,1), Qwen2.5-7B shape, random weights",
             ("", "1 GPU", "2 GPUs", "ratio"), rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=["0,1", "0"], help="GPU sets, in the order they run")
    args = parser.parse_args()
    model_dir = build(REPO / ".cache" / "bench-qwen7b")
    out = common.OUT / "gpu_multi_retrain"
    out.mkdir(parents=True, exist_ok=True)
    results = [one(model_dir, gpus, out) for gpus in args.runs]
    for r in results:
        phases = (r["report"] or {}).get("phases")
        print(f"GPUs {r['gpus']}: exit {r['exit_code']}, {r['wall_s']} s trigger -> gate, train_runtime "
              f"{r['train_runtime_s']} s, phases {phases}, peak GiB per GPU {r['peak_gib_per_gpu']}, "
              f"status {(r['report'] or {}).get('status')}", flush=True)
    machine = common.machine() | {"gpu": f"{torch_gpus()} x {common.machine().get('gpu')}"}
    path = common.save("gpu_multi_retrain", {"machine": machine, "runs": results})
    print("wrote", path)


if __name__ == "__main__":
    main()
