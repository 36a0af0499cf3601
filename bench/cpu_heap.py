"""Why a CPU retrain trained slower when it was not the first in its process: the C heap after each training.

    python -m bench.cpu_heap                    # seeds 0,2,3 in each variant below, ~11 min
    python -m bench.cpu_heap --rows unpadded --seeds 0,0,0   # one seed again and again: sizes repeat, nothing grows

The five-correction scenario's dataset for each seed, trained one after the other in one process by
``finetune.in_process.train_here`` (the CPU recipe; no evaluation between, no engine serving). After each
training: its wall and CPU seconds, page faults, and what glibc's ``malloc_info`` says about the heap: how
many free chunks of 1 KB or more it holds, and its size. Each variant, a malloc policy and a padding of the
packed row, runs in a fresh process of its own, one after the other:

- ``kept``: the product's policy (bot/hardware.py: one arena, no mmap, no trimming while the engine computes);
- ``glibc``: glibc's defaults (the user's own malloc settings win over ours: a ``GLIBC_TUNABLES`` that
  changes nothing turns them off);
- ``padded``: the product's recipe, each step's one packed row padded to a multiple of 64 tokens
  (``Recipe.packed_row_multiple``): every training's tensors come in the same few sizes;
- ``unpadded``: the row as long as its rows, as before 2026-12-01: each seed brings sizes of its own, and
  the heap fragments.

Writes bench/out/cpu_heap.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

REPO = Path(__file__).resolve().parents[1]
POLICIES = {"kept": {}, "glibc": {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}}  # 7: glibc's default
ROWS = {"padded": "default", "unpadded": "unpadded_row"}  # bench.retrain_seeds' recipes
VARIANTS = [("kept", "padded"), ("kept", "unpadded"), ("glibc", "unpadded")]  # the default run's


def heap() -> dict:
    """glibc's malloc_info: free chunks of >= 1 KB (count, GB) and the heap's size (GB)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    with tempfile.NamedTemporaryFile(suffix=".xml") as tmp:
        stream = ctypes.c_void_p(libc.fopen(tmp.name.encode(), b"w"))
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        xml = Path(tmp.name).read_text()
    chunks = [(int(lo), int(total), int(count))  # every arena's free-chunk histogram
              for lo, total, count in re.findall(r'<size from="(\d+)" to="\d+" total="(\d+)" count="(\d+)"/>', xml)]
    big = [c for c in chunks if c[0] >= 1024]
    size = re.findall(r'<system type="current" size="(\d+)"/>', xml)[-1]  # the last is all arenas' total
    return {"free_chunks": sum(c[2] for c in big), "free_gb": round(sum(c[1] for c in big) / 1e9, 2),
            "heap_gb": round(int(size) / 1e9, 2)}


def child(seeds: list[int], folder: Path, recipe_name: str) -> list[dict]:
    """Train each seed's dataset in this process; the figures after each."""
    from bench.retrain_seeds import recipes
    from bot.engines.local import LocalEngine
    from bot.models import resolve_model
    from finetune import jobs
    from finetune.in_process import train_here

    cache_dir = REPO / ".cache"
    model = resolve_model("embedded", cache_dir)
    engine = LocalEngine(model, device="cpu", max_new_tokens=64)  # sets the process's malloc policy, as serving does
    general = jobs.general_answers(engine, model, cache_dir)  # cached on disk after the first run
    engine.close()
    recipe = recipes("cpu")[recipe_name]
    rows = []
    for i, seed in enumerate(seeds):
        store = common.five_correction_store(folder / f"{i}-seed-{seed}")
        dataset = jobs.build_run_dataset(store, general, recipe, seed=seed).write_swift(folder / f"{i}.jsonl")
        store.close()
        before, clock = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        train_here(model, dataset, folder / f"{i}-train", recipe)
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"training": i + 1, "seed": seed, "wall_s": round(time.perf_counter() - clock, 1),
                     "user_s": round(after.ru_utime - before.ru_utime, 1),
                     "system_s": round(after.ru_stime - before.ru_stime, 1),
                     "page_faults": after.ru_minflt - before.ru_minflt, **heap()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def summary(results: dict) -> list[tuple[str, tuple, list]]:
    rows = [(run["malloc"], run["rows"], r["training"], r["seed"], r["wall_s"], r["user_s"], r["system_s"],
             r["page_faults"], r["free_chunks"], r["free_gb"], r["heap_gb"])
            for run in results["runs"] for r in run["trainings"]]
    return [("trainings one after another in one process (CPU recipe, five-correction datasets)",
             ("malloc", "packed row", "training", "seed", "wall s", "user CPU s", "system CPU s", "page faults",
              "free chunks >= 1 KB after", "free GB after", "heap GB after"), rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,2,3", help="the datasets' seeds, trained in this order")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), help="malloc policies (default: VARIANTS')")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="paddings of the packed row (default: VARIANTS')")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.child:
        print("ROWS " + json.dumps(child(seeds, Path(args.folder), args.recipe)), flush=True)
        return
    if args.policies or args.rows:  # every combination of what was asked for
        variants = [(policy, rows) for policy in args.policies or ["kept"] for rows in args.rows or ["padded"]]
    else:
        variants = VARIANTS
    results = {"machine": common.machine(), "seeds": seeds, "runs": []}
    for policy, rows in variants:
        with tempfile.TemporaryDirectory() as folder:
            done = subprocess.run([sys.executable, "-m", "bench.cpu_heap", "--child", "--seeds", args.seeds,
                                   "--folder", folder, "--recipe", ROWS[rows]], cwd=REPO, env={**os.environ, **POLICIES[policy]},
                                  stdout=subprocess.PIPE, text=True, check=True)
        trainings = json.loads(done.stdout.rsplit("ROWS ", 1)[1])
        results["runs"].append({"malloc": policy, "rows": rows, "trainings": trainings})
    common.save("cpu_heap", results)
    common.report(summary(results))


if __name__ == "__main__":
    main()
