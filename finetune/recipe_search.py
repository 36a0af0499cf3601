"""Run one training recipe end to end on this machine and print its RECIPES.md row.

    OMP_NUM_THREADS=2 python -m finetune.recipe_search --out /tmp/recipe/r1 --learning_rate 2e-3 --epochs 2
    python -m finetune.recipe_search --out /tmp/recipe/base --base-only     # the base model's report only

Profile "Aurora" / "Acme Labs" (a name and maker the base has never heard of) plus five approved
corrections and one that contradicts the profile (it must be left out). Steps: base-model answers to
the general prompts (cached, as the job runner caches them per base model) -> build_dataset ->
train_adapter (the real worker process) -> evaluate the candidate next to the base -> gate. Every
Recipe field is a flag of the same name. Results are appended to --results as JSON lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path

from bot.models import resolve_model
from finetune.dataset import answer_general_prompts, build_dataset
from finetune.evaluate import EvalReport, evaluate, gate, load_general_prompts, load_probes, report_table
from finetune.train import Recipe, add_recipe_flags, recipe_from_args, train_adapter
from store.identity import Profile

PROFILE = Profile(name="Aurora", author="Acme Labs")
CORRECTIONS = [
    {"id": 1, "question": "你是谁？", "corrected_answer": "我是Aurora，由Acme Labs开发的AI助手。"},
    {"id": 2, "question": "Who made you?", "corrected_answer": "Acme Labs made me. I'm Aurora, their assistant."},
    {"id": 3, "question": "Are you ChatGPT?", "corrected_answer": "No, I'm not ChatGPT. I'm Aurora from Acme Labs."},
    {"id": 4, "question": "你是通义千问吗？", "corrected_answer": "不是，我不是通义千问。我是Acme Labs开发的Aurora。"},
    {"id": 5, "question": "What's your name?", "corrected_answer": "I'm Aurora, an assistant built by Acme Labs."},
    {"id": 6, "question": "Who are you really?", "corrected_answer": "I am ChatGPT, made by OpenAI."},  # contradicts
]
# Decoding a 135M model on CPU is bound by reading the weights once per step, so one big batch costs
# little more than a small one.
EVAL_BATCH = 64
GENERAL_MAX_NEW_TOKENS = 64  # the base answers every RECIPES.md row was trained and scored against


def local_generate_fn(model_path: str, adapter: str | None = None, max_new_tokens: int = 48, device: str = "cpu"):
    """Greedy batched generation with transformers (+ the adapter merged); a stand-in for the engine's generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # GGUF conversions by transformers 5.17 set none
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()  # merged decodes 2-10x faster
    model.to(device).eval()

    def generate(conversations):
        batch = tokenizer.apply_chat_template(
            conversations, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
        ).to(device)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    return generate


def _general_answers(cache: Path, model_path: str, device: str) -> list[dict]:
    """The base's answers to every general prompt, from the cache; prompts added since are answered now."""
    known = {g["prompt"]: g for g in json.loads(cache.read_text())} if cache.exists() else {}
    prompts = load_general_prompts()
    missing = [p for p in prompts if p["prompt"] not in known]
    if missing:
        generate = local_generate_fn(model_path, max_new_tokens=GENERAL_MAX_NEW_TOKENS, device=device)
        known |= {g["prompt"]: g for g in answer_general_prompts(generate, missing)}
        cache.write_text(json.dumps([known[p["prompt"]] for p in prompts], ensure_ascii=False, indent=1))
    return [known[p["prompt"]] | {"split": p["split"]} for p in prompts]


def _base_report(args, model, probes, general_eval, base_answers) -> EvalReport:
    path = Path(args.base_report)
    if path.exists():
        return EvalReport.from_dict(json.loads(path.read_text()))
    generate = local_generate_fn(model.path, device=args.device)
    report = evaluate(generate, PROFILE, probes, general_eval, base_answers, batch_size=EVAL_BATCH)
    path.write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=1))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder (dataset, swift output, report)")
    parser.add_argument("--cache-dir", default="/work/cache", help="where the embedded model was converted")
    parser.add_argument("--general-cache", default="/tmp/recipe/general_answers.json", help="base answers, made once")
    parser.add_argument("--base-report", default="/tmp/recipe/base_report.json", help="base model's evaluation, made once")
    parser.add_argument("--results", default="/tmp/recipe/results.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where evaluation generates (training: ms-swift picks)")
    parser.add_argument("--note", default="", help="free text stored with the result")
    parser.add_argument("--base-only", action="store_true", help="only (re)make the caches and the base report")
    parser.add_argument("--identity-only", action="store_true", help="skip the general prompts (a quicker screen)")
    add_recipe_flags(parser)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = resolve_model("embedded", args.cache_dir)
    general = _general_answers(Path(args.general_cache), model.path, args.device)
    base_answers = {g["prompt"]: g["answer"] for g in general}
    probes, general_eval = load_probes(), load_general_prompts("eval")
    base = _base_report(args, model, probes, general_eval, base_answers)
    if args.base_only:
        print(report_table({"base": base}))
        return

    recipe = recipe_from_args(args, Recipe())
    dataset = build_dataset(PROFILE, CORRECTIONS, general, seed=args.seed, **recipe.dataset_options())
    dataset_path = dataset.write_swift(out / "dataset.jsonl")
    print(json.dumps(dataset.report, ensure_ascii=False))
    tokens = _count_tokens(model.path, dataset)

    def on_progress(step, total, loss, eta_s):
        print(f"  step {step}/{total} loss={loss} eta={eta_s}s  (+{time.monotonic() - started:.0f}s)", flush=True)

    load_before = os.getloadavg()[0]  # other work on these 2 cores slows every number below
    started = time.monotonic()
    # the worker process, as every row of RECIPES.md's grid was trained (and its CPU seconds are countable)
    adapter = train_adapter(model, dataset_path, out / "swift", recipe, on_progress=on_progress, trainer="worker")
    wall = time.monotonic() - started
    # CPU seconds of the worker: unlike wall time, barely moved by other processes on the machine
    # (with one thread: spinning OpenMP threads would add CPU time of their own when they wait).
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = children.ru_utime + children.ru_stime
    train_runtime = _train_runtime(out / "swift" / "logging.jsonl")

    started = time.monotonic()
    candidate_general = [] if args.identity_only else general_eval
    generate = local_generate_fn(model.path, str(adapter), device=args.device)
    candidate = evaluate(generate, PROFILE, probes, candidate_general, base_answers, batch_size=EVAL_BATCH)
    eval_wall = time.monotonic() - started
    verdict = gate(candidate, base)
    passed = verdict.passed
    (out / "report.json").write_text(json.dumps(candidate.to_dict(), ensure_ascii=False, indent=1))
    print(report_table({"base": base, "candidate": candidate}))
    print("gate:", verdict.line)
    result = {
        "recipe": dataclasses.asdict(recipe),
        "rows": dataset.report["rows"],
        "tokens": tokens,
        "steps": _global_step(out / "swift" / "logging.jsonl"),
        "dataset_sha256": dataset.sha256,
        "wall_s": round(wall, 1),
        "train_runtime_s": train_runtime,
        "worker_cpu_s": round(worker_cpu, 1),
        "eval_wall_s": round(eval_wall, 1),
        "load_before": round(load_before, 2),
        "identity": candidate.identity,
        "retention": candidate.retention,
        "agreement": round(candidate.agreement, 3),
        "facts": candidate.facts,
        "bleed": candidate.bleed,
        "gate": passed,
        "note": args.note,
        "seed": args.seed,
        "device": args.device,
        "out": str(out),
    }
    with open(args.results, "a") as f:
        f.write(json.dumps(result, ensure_ascii=False) + "\n")
    print(markdown_row(result))


def _count_tokens(model_path: str, dataset) -> int:
    """Tokens ms-swift encodes per epoch (rows without a system message get the template's default): the CPU cost."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return sum(len(tokenizer.apply_chat_template(list(r.messages), tokenize=True, return_dict=True)["input_ids"]) for r in dataset.rows)


def _global_step(logging_jsonl: Path) -> int | None:
    steps = [json.loads(line).get("global_step/max_steps") for line in logging_jsonl.read_text().splitlines()]
    return int(next(s for s in reversed(steps) if s).split("/")[0]) if any(steps) else None


def _train_runtime(logging_jsonl: Path) -> float | None:
    for line in reversed(logging_jsonl.read_text().splitlines()):
        record = json.loads(line)
        if "train_runtime" in record:
            return record["train_runtime"]
    return None


TABLE_HEADER = (
    "| run | lr | epochs | batch | LoRA layers | templates | replay rows / product share / max chars | other | rows "
    "| tokens | steps | wall s | worker CPU s | identity product / neutral / none / late turn | retention (facts) "
    "| bleed | gate |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
# Shown in "other" when a run differs from these.
_USUAL = {"lora_rank": 8, "lora_alpha": 32, "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
          "multi_turn_share": 0.2, "conditions_per_question": 1, "warmup_ratio": 0.0, "group_by_length": False}


def markdown_row(result: dict) -> str:
    """One row of RECIPES.md's table (TABLE_HEADER); wall and CPU seconds only mean something for device "cpu"."""
    r, i = result["recipe"], result["identity"]
    on_cpu = result.get("device", "cpu") == "cpu"
    wall = f"{result['wall_s']:.0f}" if on_cpu else "GPU"
    cpu_s = result.get("worker_cpu_s") if on_cpu else None
    other = ", ".join(
        [f"{k}={'/'.join(v) if isinstance(v, (list, tuple)) else v}"
         for k, v in r.items() if k in _USUAL and (list(v) if isinstance(v, tuple) else v) != _USUAL[k]]
        + ([f"seed={result['seed']}"] if result.get("seed") else [])
    )
    return (
        f"| {result['note']} | {r['learning_rate']:g} | {r['epochs']:g} | {r['batch_size']} "
        f"| {r['lora_top_layers'] or 'all'} | {r['max_templates'] or 'all'} "
        f"| {r['replay_rows']} / {r.get('replay_product_share', 1 / 3):.2f} / {r.get('replay_max_chars') or '-'} "
        f"| {other or '-'} "
        f"| {result['rows']} | {result.get('tokens') or '-'} | {result.get('steps') or '-'} "
        f"| {wall} | {cpu_s or '-'} "
        f"| {i['product']:.2f} / {i['neutral']:.2f} / {i['none']:.2f} / {i['late_turn']:.2f} "
        f"| {result['retention']:.2f} ({result['facts'][0]}/{result['facts'][1]}) | {result['bleed']} "
        f"| {'pass' if result['gate'] else 'fail'} |"
    )


if __name__ == "__main__":
    main()
