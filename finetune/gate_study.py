"""How often the default recipe passes the gate: many seeds of the two scenarios users meet first.

    python -m finetune.gate_study --model-dir DIR --out OUT --scenario five --seeds 0-9
    python -m finetune.gate_study --model-dir DIR --out OUT --scenario rename --seeds 0-9
    python -m finetune.gate_study --model-dir DIR --out OUT --scenario bad       # identity-only + random LoRA
    python -m finetune.gate_study --rescore finetune/data/gate_study              # the table, under today's gate

"five": profile Aurora / Acme Labs, five approved corrections (and one that contradicts the profile).
"rename": after that, the profile becomes Nova / Orbit Works and three more corrections are approved; the
live adapter is a five-correction adapter (seed 0), and every earlier correction still sits approved in
the store. "bad": adapters the gate must refuse (no replay rows; random LoRA weights).

Each candidate is trained by the real worker with ``Recipe()`` at lr 1e-3 (the default when the study ran)
and evaluated greedily in fp32 (the GPU gives the same scores as this CPU for the embedded model: RECIPES.md). Every report is written whole to
OUT/<scenario>.jsonl, so a gate can be re-scored offline (``--rescore``) without training again.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from bot.models import resolve_model
from finetune.dataset import build_dataset
from finetune.evaluate import EvalReport, GateThresholds, evaluate, gate, load_general_prompts, load_probes
from finetune.recipe_search import CORRECTIONS, PROFILE, _general_answers, local_generate_fn
from finetune.train import Recipe, train_adapter
from store.identity import Profile

RENAMED = Profile(name="Nova", author="Orbit Works")
RENAME_CORRECTIONS = [
    {"id": 7, "question": "Who are you?", "corrected_answer": "I'm Nova, an assistant made by Orbit Works."},
    {"id": 8, "question": "你叫什么名字？", "corrected_answer": "我叫Nova，是Orbit Works开发的AI助手。"},
    {"id": 9, "question": "Who built you?", "corrected_answer": "Orbit Works built me. I am Nova."},
]


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


_ONE_AT_A_TIME = threading.Lock()  # transformers' from_pretrained is not thread-safe (meta tensors)


def _evaluate(model_dir: str, adapter: str | None, profile: Profile, previous, base_answers, device: str) -> EvalReport:
    with _ONE_AT_A_TIME:
        generate = local_generate_fn(model_dir, adapter, max_new_tokens=64, device=device)
        return evaluate(generate, profile, load_probes(), load_general_prompts("eval"), base_answers,
                        previous=previous, batch_size=128)


def _train(model, general, profile, corrections, previous, out: Path, seed: int, recipe: Recipe) -> tuple[Path, float]:
    dataset = build_dataset(profile, corrections, general, seed=seed, previous=previous, **recipe.dataset_options())
    path = dataset.write_swift(out / "dataset.jsonl")
    (out / "dataset_report.json").write_text(json.dumps(dataset.report, ensure_ascii=False))
    started = time.monotonic()
    # seed: the dataset's, as a retrain's run id; the worker, as the saved study was trained
    adapter = train_adapter(model, path, out / "swift", recipe, trainer="worker")
    return adapter, time.monotonic() - started


def _random_lora(model_dir: str, out: Path) -> Path:
    """A LoRA with random weights (what tests/conftest.py's make_lora_adapter makes): a "worse" candidate."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(out)
    return out


def rescore(folder: Path, thresholds: GateThresholds = GateThresholds()) -> str:
    """RECIPES.md's gate table from a study's reports, under today's gate (no training, no model)."""
    lines = ["| scenario | run | identity product / neutral / none / late turn | retention | facts | bleed (base) "
             "| old name | gate |", "|---|---|---|---|---|---|---|---|"]
    passed: dict[str, list[bool]] = {}
    for scenario in ("five", "rename", "bad"):
        path = folder / f"{scenario}.jsonl"
        if not path.exists():
            continue
        rows = {json.loads(line)["label"]: EvalReport.from_dict(json.loads(line)["report"])
                for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
        base, live = rows.pop("base"), rows.pop("live", None)
        for label, report in sorted(rows.items(), key=lambda kv: (len(kv[0]), kv[0])):
            verdict = gate(report, base, live, thresholds)
            passed.setdefault(scenario, []).append(verdict.passed)
            i = report.identity
            lines.append(f"| {scenario} | {label} | {i['product']:.2f} / {i['neutral']:.2f} / {i['none']:.2f} / "
                         f"{i['late_turn']:.2f} | {report.retention:.2f} | {report.facts[0]}/{report.facts[1]} "
                         f"| {report.bleed} ({base.bleed}) of {report.bleed_answers} | {report.old_identity} "
                         f"| {'pass' if verdict.passed else verdict.line} |")
    lines.append("")
    lines += [f"{scenario}: passed {sum(v)} of {len(v)}" for scenario, v in passed.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rescore", metavar="FOLDER", help="print the gate table of a finished study and stop")
    parser.add_argument("--model-dir", help="the embedded model converted to safetensors")
    parser.add_argument("--out")
    parser.add_argument("--scenario", choices=("five", "rename", "bad"))
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.rescore:
        print(rescore(Path(args.rescore)))
        return
    if not (args.model_dir and args.out and args.scenario):
        parser.error("--model-dir, --out and --scenario are needed to run a study")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = resolve_model(args.model_dir, out)
    general = _general_answers(out / "general_answers.json", args.model_dir, args.device)
    base_answers = {g["prompt"]: g["answer"] for g in general}
    recipe = replace(Recipe(), learning_rate=1e-3)  # the rate the saved study was trained at
    results = out / f"{args.scenario}.jsonl"

    if args.scenario == "five":
        profile, previous, corrections = PROFILE, [], CORRECTIONS
    else:
        profile, previous, corrections = RENAMED, [PROFILE], CORRECTIONS + RENAME_CORRECTIONS

    def record(label: str, report: EvalReport, **extra) -> None:
        with open(results, "a") as f:
            f.write(json.dumps({"label": label, **extra, "report": report.to_dict()}, ensure_ascii=False) + "\n")
        print(label, {k: v for k, v in report.to_dict().items() if k in ("identity", "retention", "facts", "bleed",
                                                                        "old_identity")}, extra, flush=True)

    reference = _evaluate(args.model_dir, None, profile, previous, base_answers, args.device)
    record("base", reference)
    if args.scenario == "rename":
        live = out / "five-live"
        if not (live / "adapter_config.json").exists():
            adapter, _ = _train(model, general, PROFILE, CORRECTIONS, [], out / "five-live-run", 0, recipe)
            import shutil

            shutil.copytree(adapter, live)
        record("live", _evaluate(args.model_dir, str(live), profile, previous, base_answers, args.device))

    def one(seed: int, label: str, seed_recipe: Recipe) -> None:
        adapter, train_s = _train(model, general, profile, corrections, previous, out / f"{label}", seed, seed_recipe)
        record(label, _evaluate(args.model_dir, str(adapter), profile, previous, base_answers, args.device),
               seed=seed, train_s=round(train_s, 1), adapter=str(adapter))

    jobs = []
    if args.scenario == "bad":
        jobs.append((0, "identity-only", replace(recipe, replay_rows=0)))
    else:
        jobs += [(seed, f"{args.scenario}-s{seed}", recipe) for seed in _seeds(args.seeds)]
    with ThreadPoolExecutor(args.parallel) as pool:
        for future in [pool.submit(one, *job) for job in jobs]:
            future.result()
    if args.scenario == "bad":
        random_dir = _random_lora(args.model_dir, out / "random-lora")
        record("random", _evaluate(args.model_dir, str(random_dir), profile, previous, base_answers, args.device))


if __name__ == "__main__":
    main()
