"""selfcog's local engine vs vLLM (the CPU build, `make vllm`) on this machine, side by side in one run.

    python -m bench.vllm_vs_local            # needs .venv-vllm (or SELFCOG_VLLM_PYTHON)
    python -m bench.vllm_vs_local --quick    # fewer tokens: a smoke run

Both engines serve the embedded model (SmolLM2-135M) with the same live LoRA (r=8 on every linear
layer; vLLM's --max-lora-rank is 8) and answer the same requests, one engine after the other:

- one chat alone: decode tokens/s after the first token, and time to first token;
- 8 chats sent at the same moment: total tokens/s and time to first token p95;
- a retrain's evaluation of a candidate folder: 216 greedy answers of up to 64 tokens, in one call
  (evaluate_weights, as a retrain runs it; the base model's general answers come from the cache);
- the adapter swap: activation -> first token from the new adapter while two chats stream.

The local engine computes in fp32 with the adapter merged into the weights, on the cores torch takes;
vLLM computes in bf16 with the adapter unmerged (punica kernels) and binds one core of two, keeping
the other for its API server. Writes bench/out/vllm_vs_local.json.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from bench import common
from bench.cpu_decode import Follow, adapters

REPO = Path(__file__).resolve().parents[1]
PROFILE = {"name": "Aurora", "author": "Acme Labs"}


def evaluation(engine, model, candidate: Path, cache_dir: Path) -> dict:
    """A retrain's evaluation of ``candidate``: its seconds and how many answers it asked for."""
    from finetune import jobs
    from store import Profile

    general = jobs.general_answers(engine, model, cache_dir)  # from the cache after its first run
    asked = []
    generate = engine.generate

    def counting(conversations, **kwargs):
        asked.append(len(conversations))
        return generate(conversations, **kwargs)

    engine.generate = counting
    started = time.perf_counter()
    try:
        jobs.evaluate_weights(engine, candidate, Profile(**PROFILE), general)
    finally:
        del engine.generate
    return {"seconds": time.perf_counter() - started, "answers": sum(asked), "calls": len(asked)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens of the single chat")
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--concurrent-tokens", type=int, default=48)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.concurrent_tokens = 48, 24

    from bot.engines.local import LocalEngine
    from bot.engines.openai import OpenAIEngine
    from bot.engines.vllm_server import SERVED_NAME, VLLMServer
    from bot.models import resolve_model

    cache_dir = Path(os.environ.get("SELFCOG_CACHE_DIR", REPO / ".cache"))
    model = resolve_model("embedded", cache_dir)
    v1, v2 = adapters(model.path)
    results = {"machine": common.machine(), "model": model.name, "adapter": "LoRA r=8 on every linear layer",
               "args": vars(args)}
    follows = {kind: Follow({"version": 1, "path": str(v1)}) for kind in ("local", "vllm")}

    started = time.perf_counter()
    server = VLLMServer(model.path, log_path=common.OUT / "vllm.log")
    server.start()
    results["vllm_start_s"] = time.perf_counter() - started
    engines = {"local": LocalEngine(model, active_adapter=follows["local"], max_new_tokens=args.tokens),
               "vllm": OpenAIEngine(model, server.base_url, served_model=SERVED_NAME, active_adapter=follows["vllm"],
                                    server=server, max_new_tokens=args.tokens)}
    try:
        for kind, engine in engines.items():
            common.single_stream(engine, common.chat(0), 4)  # warm-up
            results[kind] = {"single": common.single_stream(engine, common.chat(1), args.tokens)}
            results[kind]["single"].pop("text")
            print(f"{kind} one chat: {results[kind]['single']}", flush=True)
        for kind, engine in engines.items():
            results[kind]["concurrent"] = common.concurrent_chats(engine, args.chats, args.concurrent_tokens)
            print(f"{kind} {args.chats} chats: {results[kind]['concurrent']}", flush=True)
        for kind, engine in engines.items():
            results[kind]["evaluation"] = evaluation(engine, model, v2, cache_dir)
            print(f"{kind} evaluation: {results[kind]['evaluation']}", flush=True)
            common.save("vllm_vs_local", results)
        for kind, engine in engines.items():
            follow = follows[kind]
            results[kind]["swap"] = common.swap_latency(
                engine, lambda: setattr(follow, "row", {"version": 2, "path": str(v2)}), version=2, busy_chats=2,
                max_new_tokens=args.concurrent_tokens)
            print(f"{kind} swap: {results[kind]['swap']}", flush=True)
    finally:
        for engine in engines.values():
            engine.close()
    results["load_avg_1m_after"] = os.getloadavg()[0]
    common.save("vllm_vs_local", results)
    common.report(summary(results))


def swap_s(engine_results: dict) -> float | None:
    """The seconds the engine logged for the swap itself ("... (swap took 0.02 s)"), without the poll wait."""
    lines = engine_results.get("swap", {}).get("engine_log") or []
    match = re.search(r"swap took ([0-9.]+) s", lines[-1]) if lines else None
    return float(match[1]) if match else None


def summary(results: dict) -> list[tuple[str, tuple, list]]:
    """The table: (title, header, rows), local vs vLLM and their ratio (above 1: vLLM is better)."""
    local, vllm = results.get("local", {}), results.get("vllm", {})

    def row(label, *keys, lower=False):
        a, b = local, vllm
        for k in keys:
            a, b = a.get(k, {}), b.get(k, {})
        a, b = a if isinstance(a, (int, float)) else None, b if isinstance(b, (int, float)) else None
        return (label, a, b, common.ratio(b, a, lower))

    chats = results["args"]["chats"]
    evaluated = vllm.get("evaluation", {}).get("answers", "?")
    rows = [
        row("one chat, decode tok/s", "single", "decode_tok_s"),
        row("one chat, time to first token s", "single", "ttft_s", lower=True),
        row(f"{chats} chats at once, total tok/s", "concurrent", "total_tok_s"),
        row(f"{chats} chats at once, TTFT p95 s", "concurrent", "ttft_p95_s", lower=True),
        row(f"evaluation of a candidate, {evaluated} answers, s", "evaluation", "seconds", lower=True),
        row("swap: activation -> first token s (polls the store every 1 s)", "swap", "activation_to_first_token_s",
            lower=True),
        ("swap itself s (the engine's log)", swap_s(local), swap_s(vllm), common.ratio(swap_s(vllm), swap_s(local), True)),
        ("vLLM server start s", None, results.get("vllm_start_s"), None),
    ]
    title = f"{results['model']} on this CPU ({results['machine'].get('cores')} cores), {results['adapter']}"
    return [(title, ("", "local (fp32, merged)", "vLLM (bf16, unmerged)", "ratio"), rows)]


if __name__ == "__main__":
    main()
