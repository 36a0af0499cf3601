"""How often a recipe passes the gate through the real retrain pipeline: many dataset seeds, one engine.

    python -m bench.retrain_seeds --recipes default --seeds 0-9                 # this CPU: ~3 min a seed
    python -m bench.retrain_seeds --recipes default one_epoch --seeds 0-9 --device cuda   # embedded model on a GPU

Each seed is the five-correction scenario (tests/scenario.py) in a fresh data directory, carried by
``finetune.jobs.run_retrain`` exactly as a trigger from the admin page would be: dataset (the seed picks
its rows), in-process training, evaluation against the base under the current profile, the gate, the
swap. One engine serves every seed (it follows each seed's store), so the base model's general answers
and evaluation are computed once. Writes bench/out/retrain_seeds-<device>.jsonl, a line per run, and
prints how many passed with the phase times.

On a GPU the engine lends its own weights to the trainer (bf16, as serving); on the CPU training takes a
copy (fp32 weights, bf16 autocast where the CPU has bf16 instructions). The scores are the product's own
evaluation either way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from bench import common



def recipes(device: str) -> dict:
    from finetune.train import CPU_SMALL, cpu_dtype

    base = replace(CPU_SMALL, dtype="bfloat16" if device.startswith("cuda") else cpu_dtype())
    return {
        "default": base,  # random batches, packed, 2 epochs at 1.5e-3
        "unpadded_row": replace(base, packed_row_multiple=0),  # the one packed row as long as its rows (before 12-01)
        "padded": replace(base, pack_rows=False),  # the same batches with their padding (before packing)
        "lr_1e-3": replace(base, learning_rate=1e-3),  # the rate before
        "conditions_2_lr_1e-3": replace(base, learning_rate=1e-3, conditions_per_question=2),
        "length_windows": replace(base, length_window=4),
        "one_epoch_windows": replace(base, epochs=1, learning_rate=2e-3, length_window=4),
        "epochs_1.5": replace(base, epochs=1.5, learning_rate=1.5e-3),
        "epochs_1.5_2e-3": replace(base, epochs=1.5, learning_rate=2e-3),
        "fp32": replace(base, dtype="float32"),
        "lora_bf16": replace(base, lora_in_base_dtype=True),  # the LoRA weights in the bf16 base's dtype (GPU)
        "fused_kernels": replace(base, fused_kernels=True),  # Liger's RMSNorm/SwiGLU/RoPE kernels (GPU)
        "replay_96": replace(base, replay_rows=96),  # more of the base's own answers: facts kept after a rename?
        # one pass over the rows (half the tokens: the CPU's 120 s budget), at higher rates or in smaller batches
        "one_epoch_2e-3": replace(base, epochs=1, learning_rate=2e-3),
        "one_epoch_3e-3": replace(base, epochs=1, learning_rate=3e-3),
        "one_epoch_b4_1.5e-3": replace(base, epochs=1, batch_size=4),
        "one_epoch_b4_2e-3": replace(base, epochs=1, batch_size=4, learning_rate=2e-3),
        # LoRA on the last layers only: the backward pass stops there (7 CPU steps 8.8 s for 20 of the 30
        # layers, 7.9 s for 15, against 10.5 s for all)
        "top_20_layers": replace(base, lora_top_layers=20),
        "top_15_layers": replace(base, lora_top_layers=15),
        "top_10_layers": replace(base, lora_top_layers=10),
        # batches of 16: half the steps for the same rows and epochs, so half of what a CPU step costs beyond
        # its tokens (5-6% of the training here); fewer updates, so a higher rate too. 8 and 7 of 10 passed
        "batch_16": replace(base, batch_size=16),
        "batch_16_2e-3": replace(base, batch_size=16, learning_rate=2e-3),
        # between 1.5 epochs (32 steps) and the default's 2: 9 of 10 each (RECIPES.md, "Fewer optimizer steps")
        "epochs_1.5_1.75e-3": replace(base, epochs=1.5, learning_rate=1.75e-3),
        "epochs_1.75": replace(base, epochs=1.75),
    }


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def one_seed(engine, model, cache_dir: Path, recipe, seed: int, folder: Path, holder: dict, trainer: str = "auto",
             scenario: str = "five") -> dict:
    """One dataset seed of the scenario: "five" = the five-correction retrain; "rename" = that retrain, and
    once it is live the profile becomes Nova / Orbit Works with three more corrections (the gate study's)
    and a second retrain, which is the one reported (with the first's outcome)."""
    import finetune.jobs as jobs

    store = common.five_correction_store(folder)
    holder["store"] = store
    engine.refresh_adapter()  # this seed's store: nothing live yet
    build = jobs.build_run_dataset
    jobs.build_run_dataset = lambda store, general, recipe, seed_=None, **kw: build(store, general, recipe, seed=seed)

    def retrain() -> tuple[dict, float]:
        run = store.runs.request("bench", "bench", claim=True)
        started = time.perf_counter()
        report = jobs.run_retrain(run, store=store, engine=engine, model=model, recipe=recipe,
                                  settings=jobs.JobSettings(folder, cache_dir, device=engine.device, trainer=trainer))
        return report, time.perf_counter() - started

    extra = {}
    try:
        report, wall = retrain()
        if scenario == "rename" and report["status"] == "promoted":
            from finetune.gate_study import RENAME_CORRECTIONS, RENAMED

            extra = {"first_status": report["status"], "first_wall_s": round(wall, 1)}
            store.identity.set(name=RENAMED.name, author=RENAMED.author, changed_by="bench")
            for row in RENAME_CORRECTIONS:
                store.corrections.add(question=row["question"], corrected_answer=row["corrected_answer"],
                                      channel="import", status="approved")
            report, wall = retrain()
        elif scenario == "rename":
            extra = {"first_status": report["status"], "first_verdict": report.get("verdict")}
    finally:
        jobs.build_run_dataset = build
    return {"seed": seed, "scenario": scenario, **extra, "status": report["status"], "wall_s": round(wall, 1),
            "phases": report.get("phases"), "candidate": (report.get("metrics") or {}).get("candidate"),
            "base": (report.get("metrics") or {}).get("base"), "verdict": report.get("verdict") or report.get("reason"),
            "eval_precision": report.get("eval_precision"), "first_look": report.get("first_look"),
            "adapter_version": engine.adapter_version}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["default"])
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="the engine's precision (it writes the replay rows and evaluates; on a GPU it is the training's too)")
    parser.add_argument("--eval-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="what the evaluation's matrix products compute in (SELFCOG_EVAL_DTYPE)")
    parser.add_argument("--trainer", default="auto", choices=["auto", "in-process", "worker"])
    parser.add_argument("--train-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="the training's precision; auto: the engine's on a GPU (its lent weights), the "
                             "recipe's on a CPU. bfloat16 with an fp32 engine on a GPU is bf16 autocast on fp32 "
                             "weights, as a CPU with bf16 instructions trains its fp32 copy")
    parser.add_argument("--scenario", default="five", choices=["five", "rename"],
                        help="rename: after the five-correction retrain, a new name and maker and a second retrain")
    parser.add_argument("--cache-dir", default=None, help="where the embedded model is (default: the repo's .cache)")
    args = parser.parse_args()

    from bot.engines.local import LocalEngine
    from bot.models import resolve_model

    cache_dir = Path(args.cache_dir or Path(__file__).resolve().parents[1] / ".cache")
    model = resolve_model("embedded", cache_dir)
    holder: dict = {}
    engine = LocalEngine(model, device=args.device, max_new_tokens=64, dtype=args.engine_dtype,
                         eval_dtype=args.eval_dtype, active_adapter=lambda: holder["store"].adapters.active() if "store" in holder else None)
    out = common.OUT / f"retrain_seeds-{args.device.split(':')[0]}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    table = []
    for name in args.recipes:
        recipe = recipes(args.device)[name]
        if args.train_dtype != "auto":
            recipe = replace(recipe, dtype=args.train_dtype)
        elif engine.precision == "fp32" and args.device.startswith("cuda"):
            recipe = replace(recipe, dtype="float32")  # the lent weights are fp32: train as the CPU does
        results = []
        for seed in _seeds(args.seeds):
            result = one_seed(engine, model, cache_dir, recipe, seed, common.OUT / "retrain_seeds" / f"{name}-{seed}", holder,
                              args.trainer, args.scenario)
            result |= {"recipe": name, "device": args.device, "engine_precision": engine.precision, "trainer": args.trainer,
                       "train_dtype": recipe.dtype, "machine": common.machine()}
            with open(out, "a", encoding="utf-8") as f:
                f.write(json.dumps(result, ensure_ascii=False) + "\n")
            c = result["candidate"] or {}
            print(f"{name} seed {seed}: {result['status']} in {result['wall_s']} s {result['phases']} "
                  f"identity {c.get('identity')} bleed {c.get('bleed')} retention {c.get('retention')} "
                  f"facts {c.get('facts')} old name {c.get('old_identity')} "
                  f"| {result['verdict']}", flush=True)
            results.append(result)
        passed = sum(r["status"] == "promoted" for r in results)
        walls = [r["wall_s"] for r in results]
        table.append((name, f"{passed}/{len(results)}", round(statistics.median(walls), 1), max(walls)))
    engine.close()
    common.report([(f"retrain seeds on {args.device} (engine {engine.precision})",
                    ("recipe", "promoted", "median trigger -> live s", "slowest s"), table)])


if __name__ == "__main__":
    main()
