"""Chat decode on this machine's CPU, embedded default model (SmolLM2-135M fp32), LoRA adapter active: the old engine vs selfcog's.

    python -m bench.cpu_decode            # part of `make bench`
    python -m bench.cpu_decode --quick    # fewer tokens, one round

Both engines are loaded in this process and serve the same requests, alternately, round after round
(a shared machine's speed drifts; the ratio within a round is what to read):

- one chat alone: decode tokens/s (after the first token) and time to first token;
- N chats sent at the same moment: time to first token p50/p95 and total tokens/s;
- the adapter swap: activation -> first token from the new adapter while chats stream, and whether
  every streaming chat finished;
- transformers' own continuous batching (``generate_batch``, paged attention) on the same weights and
  chats, for comparison with the engine's scheduler.

Writes bench/out/cpu_decode.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

from bench import common
from bench.common import Follow

REPO = Path(__file__).resolve().parents[1]


def adapters(model_path: str) -> list[Path]:
    """Two random LoRA adapters (r=8, every linear layer) for the embedded model, made once."""
    from transformers import AutoModelForCausalLM

    folders = [common.OUT / "cpu_adapters" / f"v{v}" for v in (1, 2)]
    if not all((f / "adapter_config.json").exists() for f in folders):
        base = AutoModelForCausalLM.from_pretrained(model_path)
        for version, folder in enumerate(folders, 1):
            common.make_lora_adapter(base, folder, seed=version, rank=8)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens per single chat")
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--concurrent-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--eval-slots", type=int, nargs="+", metavar="N",
                        help="then the evaluation workload (one call) on engines of N cache slots each")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.concurrent_tokens, args.rounds = 48, 24, 1

    from bench.baseline import baseline_engine_class
    from bot.engines.local import LocalEngine
    from bot.models import resolve_model

    model = resolve_model("embedded", os.environ.get("SELFCOG_CACHE_DIR", REPO / ".cache"))
    v1, v2 = adapters(model.path)
    results = {"machine": common.machine(), "model": f"{model.name} fp32", "adapter": "LoRA r=8 on every linear layer",
               "args": vars(args), "rounds": []}
    follows = {"baseline": Follow({"version": 1, "path": str(v1)}), "selfcog": Follow({"version": 1, "path": str(v1)})}
    engines = {"baseline": baseline_engine_class()(model, active_adapter=follows["baseline"], max_new_tokens=args.tokens),
               "selfcog": LocalEngine(model, active_adapter=follows["selfcog"], max_new_tokens=args.tokens)}
    for engine in engines.values():
        common.single_stream(engine, common.chat(0), 4)  # warm-up

    for r in range(args.rounds):
        record = {"load_avg_1m": os.getloadavg()[0]}
        for kind, engine in engines.items():
            record[kind] = {"single": common.single_stream(engine, common.chat(r), args.tokens)}
            record[kind]["single"].pop("text")
            print(f"[round {r}] {kind} single: {record[kind]['single']}", flush=True)
        for kind, engine in engines.items():
            record[kind]["concurrent"] = common.concurrent_chats(engine, args.chats, args.concurrent_tokens)
            print(f"[round {r}] {kind} {args.chats} chats: {record[kind]['concurrent']}", flush=True)
        results["rounds"].append(record)
        common.save("cpu_decode", results)

    results["swap"] = {}
    for kind, engine in engines.items():
        follow = follows[kind]
        results["swap"][kind] = common.swap_latency(
            engine, lambda: setattr(follow, "row", {"version": 2, "path": str(v2)}), version=2, busy_chats=2,
            max_new_tokens=args.concurrent_tokens)
        print(f"swap {kind}: {results['swap'][kind]}", flush=True)
    common.save("cpu_decode", results)

    base, tokenizer = engines["selfcog"].base, engines["selfcog"].tokenizer
    engines["baseline"].close()
    try:
        from bench.gpu_decode import hf_continuous_batching

        engines["selfcog"].close()  # the worker is idle; generate_batch uses the same merged weights
        results["hf_generate_batch"] = hf_continuous_batching(base, tokenizer, args.chats, args.concurrent_tokens)
    except Exception as e:  # a comparison, not the product: record and go on
        results["hf_generate_batch"] = {"error": repr(e)[:500]}
    print(f"transformers generate_batch: {results['hf_generate_batch']}", flush=True)
    del engines, base
    gc.collect()
    if args.eval_slots:
        from bench.gpu_decode import eval_by_slots

        results["eval_by_slots"] = eval_by_slots(model, [v1, v2], argparse.Namespace(device="cpu", **vars(args)))
    results["machine_after"] = {"load_avg_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M")}
    common.save("cpu_decode", results)
    common.report(summary(results))


def summary(results: dict) -> list[tuple[str, tuple, list]]:
    """The tables RESULTS.md and the console show: (title, header, rows); medians over rounds."""
    rounds = results["rounds"]

    def med(kind, *keys):
        values = []
        for r in rounds:
            d = r.get(kind, {})
            for k in keys:
                d = d.get(k, {}) if isinstance(d, dict) else {}
            values.append(d if isinstance(d, (int, float)) else None)
        return common.median(values)

    def ratios(*keys, lower=False):
        """The ratio within each round (same moment, same load), then the median of those."""
        values = []
        for r in rounds:
            new, old = r["selfcog"], r["baseline"]
            for k in keys:
                new, old = new.get(k, {}), old.get(k, {})
            values.append(common.ratio(new or None, old or None, lower))
        return common.median(values)

    chats = results["args"]["chats"]
    rows = [
        ("one chat, decode tok/s", med("baseline", "single", "decode_tok_s"), med("selfcog", "single", "decode_tok_s"),
         ratios("single", "decode_tok_s"), ">= 40"),
        ("one chat, time to first token s", med("baseline", "single", "ttft_s"), med("selfcog", "single", "ttft_s"),
         ratios("single", "ttft_s", lower=True), ""),
        (f"{chats} chats at once, TTFT p50 s", med("baseline", "concurrent", "ttft_p50_s"),
         med("selfcog", "concurrent", "ttft_p50_s"), ratios("concurrent", "ttft_p50_s", lower=True), ""),
        (f"{chats} chats at once, TTFT p95 s", med("baseline", "concurrent", "ttft_p95_s"),
         med("selfcog", "concurrent", "ttft_p95_s"), ratios("concurrent", "ttft_p95_s", lower=True), "<= 2"),
        (f"{chats} chats at once, total tok/s", med("baseline", "concurrent", "total_tok_s"),
         med("selfcog", "concurrent", "total_tok_s"), ratios("concurrent", "total_tok_s"), ""),
    ]
    swap = results.get("swap", {})
    if swap:
        old, new = swap.get("baseline", {}), swap.get("selfcog", {})
        rows.append(("swap: activation -> first token s", old.get("activation_to_first_token_s"),
                     new.get("activation_to_first_token_s"),
                     common.ratio(new.get("activation_to_first_token_s"), old.get("activation_to_first_token_s"), True),
                     "<= 2"))
        rows.append(("swap: chats streaming meanwhile, finished",
                     f"{old.get('busy_chats_finished')}/{old.get('busy_chats')}",
                     f"{new.get('busy_chats_finished')}/{new.get('busy_chats')}", None, "all"))
    cb = results.get("hf_generate_batch", {})
    if cb:
        rows.append((f"transformers generate_batch, {chats} chats, total tok/s", None,
                     cb.get("total_tok_s", cb.get("error")), None, ""))
    from bench.gpu_decode import eval_slots_tables

    return [(f"CPU decode, {results['model']}, adapter merged", ("", "baseline", "selfcog", "ratio", "target"), rows)
            ] + eval_slots_tables(results)


if __name__ == "__main__":
    main()
