"""Chat decode on one GPU, Qwen2.5-7B shape (random weights, bf16), LoRA adapter active: the old engine vs selfcog's.

    python -m bench.gpu_decode                     # on the GPU machine; builds the model first (~25 s)
    python -m bench.gpu_decode --quick             # fewer tokens and chats

Measures, for both engines in one process: one chat's decode speed and time to first token; N chats
sent at once (time to first token p50/p95, total tokens/s); the evaluation workload (identity probes
and general prompts, 64 tokens each, candidate adapter); and for selfcog's engine the adapter swap
(activation -> first token from the new adapter, chats streaming meanwhile), how often a reply decoded
in a batch equals the same reply decoded alone, and transformers' own continuous batching
(``generate_batch``) on the same merged weights. Writes bench/out/gpu_decode.json.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from bench import common
from bench.common import Follow
from bench.gpu_model import REPO, build

PROFILE_NAME, PROFILE_AUTHOR = "Aurora", "Acme Labs"


def eval_workload(engine, adapter, chunk: int | None, limit: int | None = None) -> dict:
    """finetune.evaluate.evaluate through engine.generate: all probes x 4 ways + general prompts, 64 tokens."""
    from finetune.evaluate import evaluate, load_general_prompts, load_probes
    from finetune.jobs import EVAL_MAX_NEW_TOKENS
    from store.identity import Profile

    profile = Profile(PROFILE_NAME, PROFILE_AUTHOR)
    probes, general = load_probes(), load_general_prompts("eval")
    if limit:
        probes, general = probes[:limit], general[:max(1, limit // 4)]
    base_answers = {g["prompt"]: "" for g in general}
    calls = []

    def generate(conversations):
        calls.append(len(conversations))
        return engine.generate(conversations, adapter=adapter, max_new_tokens=EVAL_MAX_NEW_TOKENS)

    started = time.perf_counter()
    evaluate(generate, profile, probes, general, base_answers, batch_size=chunk or 10_000)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "conversations": sum(calls), "generate_calls": len(calls), "chunk": chunk or "all"}


def same_alone_and_batched(engine, n: int, max_new_tokens: int) -> dict:
    """Greedy replies streamed one at a time vs the same conversations in one generate() batch."""
    conversations = [[{"role": "user", "content": f"{common.CHAT_PROMPTS[i % 8]} (#{i})"}] for i in range(n)]
    alone = ["".join(engine.stream(c, max_new_tokens=max_new_tokens)).strip() for c in conversations]
    batched = engine.generate(conversations, max_new_tokens=max_new_tokens)
    return {"conversations": n, "identical": sum(a == b for a, b in zip(alone, batched))}


def hf_continuous_batching(model, tokenizer, n: int, max_new_tokens: int) -> dict:
    """transformers' own continuous batching (generate_batch, paged attention) on the same weights."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    prompts = [tokenizer.apply_chat_template(common.chat(i), add_generation_prompt=True, tokenize=True) for i in range(n)]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.eos_token_id)
    # Size its paged cache for this workload: left to itself it sizes from free memory, and on a CPU
    # that was everything (the process was killed for memory).
    pages = n * (-(-(max(map(len, prompts)) + max_new_tokens) // 256)) + 4
    cb = ContinuousBatchingConfig(num_blocks=pages, max_batch_tokens=max(512, n * 64))
    model.generate_batch(inputs=prompts[:2], generation_config=GenerationConfig(max_new_tokens=4, do_sample=False),
                         continuous_batching_config=cb)
    started = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=cb)
    wall = time.perf_counter() - started
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return {"chats": n, "tokens": tokens, "wall_s": wall, "total_tok_s": tokens / wall}


def run_engine(kind: str, model, adapters: list[Path], args) -> dict:
    import torch

    device = args.device

    from bot.engines.local import LocalEngine
    from bench.baseline import baseline_engine_class

    follow = Follow({"version": 1, "path": str(adapters[0])})
    started = time.perf_counter()
    if kind == "baseline":
        engine = baseline_engine_class()(model, active_adapter=follow, device=device, max_new_tokens=args.tokens)
    else:
        engine = LocalEngine(model, active_adapter=follow, device=device, max_new_tokens=args.tokens)
    result = {"load_s": time.perf_counter() - started, "adapter_version": engine.adapter_version}
    print(f"[{kind}] loaded in {result['load_s']:.1f} s", flush=True)
    common.single_stream(engine, common.chat(0), 8)  # warm-up
    singles = [common.single_stream(engine, common.chat(i), args.tokens) for i in range(args.repeats)]
    result["single"] = {"decode_tok_s": common.median([s["decode_tok_s"] for s in singles]),
                        "ttft_s": common.median([s["ttft_s"] for s in singles]),
                        "tokens": [s["tokens"] for s in singles]}
    print(f"[{kind}] single: {result['single']}", flush=True)
    if args.single_only:
        engine.close()
        return result
    result["concurrent"] = common.concurrent_chats(engine, args.chats, args.concurrent_tokens)
    print(f"[{kind}] {args.chats} chats: {result['concurrent']}", flush=True)
    # evaluation: the candidate adapter, in chunks of 16 as evaluate() used to, and in one call as it does now
    if kind == "baseline":
        one_chunk = eval_workload(engine, str(adapters[1]), chunk=16, limit=4)  # 16 + 1 conversations: one chunk
        result["eval_one_chunk"] = one_chunk
    else:
        result["eval_chunks_of_16"] = eval_workload(engine, str(adapters[1]), chunk=16)
        result["eval_one_call"] = eval_workload(engine, str(adapters[1]), chunk=None)
        print(f"[{kind}] eval: {result['eval_chunks_of_16']} / {result['eval_one_call']}", flush=True)
        result["swap"] = common.swap_latency(engine, lambda: setattr(follow, "row", {"version": 2, "path": str(adapters[1])}),
                                             version=2, busy_chats=4, max_new_tokens=args.tokens)
        print(f"[{kind}] swap: {result['swap']}", flush=True)
        result["alone_vs_batched"] = same_alone_and_batched(engine, args.alone, 64)
        print(f"[{kind}] alone vs batched: {result['alone_vs_batched']}", flush=True)
        if device == "cuda":
            result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"[{kind}] eval: {result.get('eval_one_chunk')}", flush=True)
    base = engine.base
    tokenizer = engine.tokenizer
    engine.close()
    if kind == "selfcog" and args.hf_cb:
        try:
            result["hf_generate_batch"] = hf_continuous_batching(base, tokenizer, args.chats, args.concurrent_tokens)
        except Exception as e:  # recorded, not fatal: it is a comparison
            result["hf_generate_batch"] = {"error": repr(e)[:500]}
        print(f"[hf generate_batch] {result['hf_generate_batch']}", flush=True)
    del engine, base
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def eval_by_slots(model, adapters: list[Path], args) -> dict:
    """The evaluation workload in one call on engines with different numbers of cache slots (replies decoded
    together): 260 answers take 5 rounds of 64 slots, fewer of more, each decode step reading more cache."""
    from bot.engines.local import LocalEngine

    seconds = {}
    for slots in args.eval_slots:
        engine = LocalEngine(model, active_adapter=Follow({"version": 1, "path": str(adapters[0])}), device=args.device,
                             max_new_tokens=64, batch_size=slots)
        eval_workload(engine, str(adapters[1]), chunk=None, limit=8)  # warm: the candidate's first merge
        runs = [eval_workload(engine, str(adapters[1]), chunk=None)["seconds"] for _ in range(2)]
        engine.close()
        seconds[slots] = runs
        print(f"[selfcog] eval with {slots} slots: {runs}", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / ".cache" / "bench-qwen7b"))
    parser.add_argument("--tokens", type=int, default=256, help="tokens per single chat")
    parser.add_argument("--chats", type=int, default=32)
    parser.add_argument("--concurrent-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["baseline", "selfcog"], default=None)
    parser.add_argument("--no-hf-cb", dest="hf_cb", action="store_false")
    parser.add_argument("--single-only", action="store_true", help="only the one-chat figures")
    parser.add_argument("--alone", type=int, default=16, help="conversations for the alone-vs-batched check")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--eval-slots", type=int, nargs="+", metavar="N",
                        help="only the evaluation workload (one call), on engines of N cache slots each")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script on a small model")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.chats, args.concurrent_tokens, args.repeats = 64, 8, 32, 1

    from bot.models import resolve_model

    folder = build(args.model)
    adapters = [folder / "adapters" / "v1", folder / "adapters" / "v2"]
    model = resolve_model(str(folder), REPO / ".cache")
    results = common.load("gpu_decode")  # --only and --eval-slots runs add to the last run's figures
    if args.eval_slots:
        results |= {"eval_by_slots": eval_by_slots(model, adapters, args), "eval_by_slots_machine": common.machine()}
        common.save("gpu_decode", results)
        return
    results.update({"machine": common.machine(), "model": "Qwen2.5-7B shape, random weights, bf16",
                    "adapter": "LoRA r=16 on every linear layer, merged", f"args_{args.only or 'all'}": vars(args)})
    for kind in ("baseline", "selfcog"):
        if args.only in (None, kind):
            results[kind] = run_engine(kind, model, adapters, args)
            common.save("gpu_decode", results)
    common.report(summary(results))
    common.save("gpu_decode", results)


def summary(results: dict) -> list[tuple[str, tuple, list]]:
    """The tables RESULTS.md and the console show: (title, header, rows)."""
    old, new = results.get("baseline", {}), results.get("selfcog", {})
    get = lambda r, *keys: _dig(r, keys)  # noqa: E731
    chats = get(new, "concurrent", "chats")
    alone = get(new, "alone_vs_batched")
    rows = [
        ("one chat, decode tok/s", get(old, "single", "decode_tok_s"), get(new, "single", "decode_tok_s"),
         common.ratio(get(new, "single", "decode_tok_s"), get(old, "single", "decode_tok_s")), ">= 150"),
        ("one chat, time to first token s", get(old, "single", "ttft_s"), get(new, "single", "ttft_s"),
         common.ratio(get(new, "single", "ttft_s"), get(old, "single", "ttft_s"), True), "<= 0.3"),
        (f"{chats} chats at once, total tok/s", get(old, "concurrent", "total_tok_s"), get(new, "concurrent", "total_tok_s"),
         common.ratio(get(new, "concurrent", "total_tok_s"), get(old, "concurrent", "total_tok_s")), ">= 1500"),
        (f"{chats} chats at once, TTFT p50 s", get(old, "concurrent", "ttft_p50_s"), get(new, "concurrent", "ttft_p50_s"),
         common.ratio(get(new, "concurrent", "ttft_p50_s"), get(old, "concurrent", "ttft_p50_s"), True), ""),
        (f"{chats} chats at once, TTFT p95 s", get(old, "concurrent", "ttft_p95_s"), get(new, "concurrent", "ttft_p95_s"),
         common.ratio(get(new, "concurrent", "ttft_p95_s"), get(old, "concurrent", "ttft_p95_s"), True), "<= 1"),
        ("swap: activation -> first token s", None, get(new, "swap", "activation_to_first_token_s"), None, "<= 2"),
        ("swap: chats streaming meanwhile, finished", None,
         f"{get(new, 'swap', 'busy_chats_finished')}/{get(new, 'swap', 'busy_chats')}" if get(new, "swap") else None, None,
         "all"),
        (f"eval ({get(new, 'eval_one_call', 'conversations')} x 64 tokens), one generate call s", None,
         get(new, "eval_one_call", "seconds"), None, "<= 5"),
        ("eval, in chunks of 16 (as before) s", _eval_baseline(old, new), get(new, "eval_chunks_of_16", "seconds"),
         common.ratio(get(new, "eval_chunks_of_16", "seconds"), _eval_baseline(old, new), True), ""),
        ("replies equal alone and in a batch", None, f"{alone['identical']}/{alone['conversations']}" if alone else None,
         None, ""),
        ("transformers generate_batch, total tok/s", None, get(new, "hf_generate_batch", "total_tok_s"), None, ""),
    ]
    tables = [("GPU decode, Qwen2.5-7B shape, adapter merged", ("", "baseline", "selfcog", "ratio", "target"), rows)]
    return tables + eval_slots_tables(results)


def eval_slots_tables(results: dict) -> list[tuple[str, tuple, list]]:
    """--eval-slots' table, if it ran (also cpu_decode's)."""
    if not results.get("eval_by_slots"):
        return []
    return [("The evaluation workload (one call) by the engine's cache slots, two runs each, `--eval-slots`",
             ("slots", "seconds", "rounds of 260 answers"),
             [(slots, " / ".join(f"{t:.2f}" for t in runs), -(-260 // int(slots)))  # JSON keys are strings
              for slots, runs in results["eval_by_slots"].items()])]


def _eval_baseline(old: dict, new: dict) -> float | None:
    """The old engine's evaluation time, scaled from the one chunk it ran to the full workload."""
    chunk = old.get("eval_one_chunk")
    full = new.get("eval_chunks_of_16")
    if not chunk or not full:
        return None
    return chunk["seconds"] / chunk["conversations"] * full["conversations"]


def _dig(d: dict, keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


if __name__ == "__main__":
    main()
