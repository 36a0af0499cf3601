"""What every benchmark shares: the chat workloads, timing, the machine's description, tables and JSON.

Each benchmark runs the baseline and selfcog's path in the same process, one after the other
(alternating where it repeats), so both see the same machine; the ratio is what to read when the
machine is shared and absolute figures drift.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

OUT = Path(os.environ.get("SELFCOG_BENCH_OUT", Path(__file__).parent / "out"))

# Chat prompts that ask for long answers, so a reply runs to max_new_tokens more often than not.
CHAT_PROMPTS = [
    "Tell me about the history of Paris.",
    "Write a short story about a lighthouse keeper and a storm.",
    "Explain how a bicycle works, step by step.",
    "Describe the water cycle for a ten-year-old.",
    "What should I pack for a week of hiking in the mountains?",
    "Give me a recipe for a simple vegetable soup and explain each step.",
    "Why is the sky blue? Explain in detail.",
    "Write a letter to a friend about your summer holiday.",
]
SYSTEM = "You are a helpful assistant."


class Follow:
    """The engine's active_adapter callable: what 'the store' says is active."""

    def __init__(self, row=None):
        self.row = row

    def __call__(self):
        return self.row


def chat(i: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": CHAT_PROMPTS[i % len(CHAT_PROMPTS)]}]


def machine() -> dict:
    """Where the figures came from: CPU, cores, load, GPU, library versions, date."""
    import torch
    import transformers

    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if hasattr(os, "getloadavg"):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def single_stream(engine, conversation: list[dict], max_new_tokens: int) -> dict:
    """One chat alone: time to first token and decode speed (tokens after the first / time after the first)."""
    reply = engine.stream(conversation, max_new_tokens=max_new_tokens)
    text = "".join(reply)
    decode_s = reply.seconds - reply.first_token_s
    return {"ttft_s": reply.first_token_s, "tokens": reply.completion_tokens, "seconds": reply.seconds,
            "decode_tok_s": (reply.completion_tokens - 1) / decode_s if decode_s > 0 else None, "text": text}


def concurrent_chats(engine, n: int, max_new_tokens: int) -> dict:
    """n chats sent at the same moment, each read by its own thread: TTFT p50/p95 and total tokens/s."""
    results: list[dict] = [{} for _ in range(n)]
    start = threading.Barrier(n + 1)

    def one(i: int) -> None:
        start.wait()
        reply = engine.stream(chat(i), max_new_tokens=max_new_tokens)
        for _ in reply:
            pass
        results[i] = {"ttft_s": reply.first_token_s, "tokens": reply.completion_tokens, "seconds": reply.seconds}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    ttfts = sorted(r["ttft_s"] for r in results if r.get("ttft_s") is not None)
    tokens = sum(r["tokens"] for r in results)
    return {"chats": n, "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "total_tok_s": tokens / wall, "tokens": tokens, "wall_s": wall}


def swap_latency(engine, activate, version: int, busy_chats: int, max_new_tokens: int) -> dict:
    """Activate ``version`` while chats stream; time until a reply's first token comes from it.

    ``activate()`` makes the store (or the engine's follow callable) name the new adapter; the engine
    notices by polling. The busy chats must all finish without error."""
    import logging

    errors: list[BaseException] = []
    finished = []
    swaps: list[str] = []  # the engine's own "swap took" log lines: the swap itself, without the poll wait

    class Grab(logging.Handler):
        def emit(self, record):
            if "swap took" in record.getMessage():
                swaps.append(record.getMessage())

    grab, engine_log = Grab(), logging.getLogger("bot.engines")
    engine_log.addHandler(grab)
    level = engine_log.level
    engine_log.setLevel(logging.INFO)

    def busy(i: int) -> None:
        try:
            reply = engine.stream(chat(i), max_new_tokens=max_new_tokens)
            for _ in reply:
                pass
            finished.append(reply.completion_tokens)
        except BaseException as e:  # a dropped chat is the failure this measures
            errors.append(e)

    threads = [threading.Thread(target=busy, args=(i,)) for i in range(busy_chats)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the chats are streaming
    activated = time.perf_counter()
    activate()
    first_token_s = None
    while time.perf_counter() - activated < 120:
        reply = engine.stream(chat(0), max_new_tokens=2)
        pieces = iter(reply)
        next(pieces, None)
        if reply.adapter_version == version:
            first_token_s = time.perf_counter() - activated
            list(pieces)
            break
        list(pieces)
    for t in threads:
        t.join()
    engine_log.removeHandler(grab)
    engine_log.setLevel(level)
    return {"activation_to_first_token_s": first_token_s, "busy_chats": busy_chats,
            "busy_chats_finished": len(finished), "busy_chat_errors": [repr(e) for e in errors], "engine_log": swaps}


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(new: float | None, old: float | None, lower_is_better: bool = False) -> float | None:
    """How many times better selfcog's figure is than the baseline's."""
    if not new or not old:
        return None
    return old / new if lower_is_better else new / old


def table(rows: list[tuple], header: tuple) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [tuple(fmt(v) for v in header)] + [tuple(fmt(v) for v in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def report(tables: list[tuple]) -> None:
    """Print a benchmark's summary(): (title, header, rows) tables."""
    for title, header, rows in tables:
        print(title)
        print(table(rows, header))


def save(name: str, data: dict) -> Path:
    """Write bench/out/<name>.json (the figures RESULTS.md is made from)."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str))
    return path


def load(name: str) -> dict:
    """The last figures saved under this name, or {}."""
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def make_lora_adapter(base_model, out_dir: Path, seed: int, rank: int = 8, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                      "gate_proj", "up_proj", "down_proj")) -> Path:
    """A LoRA adapter with random non-zero weights for ``base_model`` (a loaded transformers model), saved in peft format."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(base_model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                       init_lora_weights=False))
    with torch.no_grad():  # peft's random init is large for a big model: scale B down to a sane update
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    peft_model.save_pretrained(out_dir)
    peft_model.unload()  # give the base model back untouched
    return out_dir


def five_correction_store(data_dir: Path):
    """A fresh data dir's store with the Aurora profile and the five approved corrections of tests/scenario.py."""
    import shutil

    from store import Store
    from tests.scenario import FIVE_CORRECTIONS, PROFILE

    shutil.rmtree(data_dir, ignore_errors=True)
    store = Store(Path(data_dir) / "selfcog.db")
    store.identity.set(name=PROFILE.name, author=PROFILE.author, changed_by="bench")
    for row in FIVE_CORRECTIONS:
        store.corrections.add(question=row["question"], corrected_answer=row["answer"], channel="import",
                              status="approved")
    return store
