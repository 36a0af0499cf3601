"""Settings: environment variables, overridden by command-line flags. Plain values, read once.

| variable                         | default     | what                                                       |
|----------------------------------|-------------|------------------------------------------------------------|
| SELFCOG_DATA_DIR                 | ./data      | SQLite file, model cache, adapters, run folders             |
| SELFCOG_CACHE_DIR                | DATA_DIR/cache | converted models, base-answer caches (shareable)       |
| SELFCOG_DB_TIMEOUT_S             | 15          | how long a write waits for another process's lock       |
| SELFCOG_MODEL                    | embedded    | 'embedded' (SmolLM2-135M-Instruct), a local HF folder or hub id |
| SELFCOG_DEVICE                   | auto        | cuda when present, else cpu                                 |
| SELFCOG_DTYPE                    | auto        | the engine's weights: bf16 on a GPU, fp32 on a CPU; bf16 / fp32 / fp16 asks |
| SELFCOG_EVAL_DTYPE               | auto        | an evaluation's matrix products: bf16 on a CPU with bf16 instructions, else as served |
| SELFCOG_HOST / SELFCOG_PORT      | 127.0.0.1 / 7860 | where the web page listens                             |
| SELFCOG_ADMIN_PASSWORD           | (unset)     | admin page password; unset = a one-time token printed at start |
| TELEGRAM_BOT_TOKEN               | (unset)     | runs the Telegram bot when set                              |
| TELEGRAM_API_URL                 | (Telegram)  | another Bot API server (a local one, or the tests' fake)    |
| SELFCOG_ADMIN_IDS                | (none)      | Telegram user ids allowed admin commands, comma-separated   |
| SELFCOG_MAX_NEW_TOKENS           | 256         | longest reply, in tokens                                     |
| SELFCOG_ENGINE                   | local       | which engine answers: 'local' (in this process)              |
| SELFCOG_TRAINER                  | auto        | 'in-process' (ms-swift in the serving process), 'worker' (a process of its own); auto = in-process |
| SELFCOG_TRAIN_WEIGHTS            | auto        | 'serving': train on the weights that serve (chats wait), 'copy', 'auto' = serving on a GPU |
| SELFCOG_PREPARE_AHEAD            | auto        | at start, compute the first retrain's reference evaluations (and warm the GPU trainer): on / off / auto = on a GPU |
| SELFCOG_GPU_MEMORY_GB            | (all)       | use at most this much of the GPU (e.g. 24 on a bigger card)  |
| SELFCOG_CHAT_TEMPERATURE         | 0.7         | chat sampling (`ask`, evaluation and tests are greedy)       |
| SELFCOG_CHAT_TOP_P               | 0.9         | chat nucleus sampling                                        |
| SELFCOG_CHAT_REPETITION_PENALTY  | 1.15        | > 1 keeps chat replies from looping                          |
| SELFCOG_RETRAIN_EVERY_HOURS      | 0 (off)     | scheduled retrain interval                                   |
| SELFCOG_RETRAIN_MIN_CORRECTIONS  | 5           | new approved corrections needed before a scheduled retrain  |
| SELFCOG_GATE_PRODUCT / _OTHER    | 0.9 / 0.8   | identity hit rate a candidate needs (product prompt / others) |
| SELFCOG_GATE_RETENTION           | 0.45        | general-answer retention a candidate needs (floor)           |
| SELFCOG_GATE_BLEED_SHARE         | 0.10        | share of general answers that may newly mention the identity (vs the base) |
| SELFCOG_GATE_FACTS_DROP          | 2           | checkable facts the candidate may lose against the base      |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, TypeVar

from finetune.evaluate import GateThresholds

GATE = GateThresholds()

from bot.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """An environment variable holds a value selfcog cannot use; the message names it."""


def _ids(value: str) -> frozenset[int]:
    return frozenset(int(part) for part in value.replace(" ", "").split(",") if part)


def _parse(env, name: str, default: str, convert: Callable[[str], T], expected: str,
           valid: Callable[[T], bool] = lambda value: True) -> T:
    raw = env.get(name) or default
    try:
        value = convert(raw.strip())
    except (ValueError, OverflowError):
        value = None
    if value is None or not valid(value):
        raise ConfigError(f"{name} must be {expected}, not {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    cache_path: Path | None = None  # None: data_dir/cache
    db_timeout_s: float = 15.0
    model: str = "embedded"
    device: str = "auto"
    dtype: str = "auto"
    eval_dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    admin_password: str | None = None
    telegram_token: str | None = None
    telegram_api_url: str | None = None
    admin_ids: frozenset[int] = field(default_factory=frozenset)
    max_new_tokens: int = 256
    engine: str = "local"
    trainer: str = "auto"
    train_weights: str = "auto"
    prepare_ahead: str = "auto"
    chat_temperature: float = 0.7
    chat_top_p: float = 0.9
    chat_repetition_penalty: float = 1.15
    retrain_every_hours: float = 0.0
    retrain_min_corrections: int = 5
    gate: GateThresholds = GateThresholds()  # the numbers live in finetune/evaluate.py, sized in RECIPES.md

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        """The settings from environment variables; ConfigError names a variable that can't be used."""
        env = os.environ if env is None else env
        get = env.get

        def number(name, default, low=0.0, high=float("inf")):
            return _parse(env, name, default, float, f"a number from {low:g} to {high:g}", lambda v: low <= v <= high)

        def whole(name, default, low=0, high=10**9):
            return _parse(env, name, default, int, f"a whole number from {low} to {high}", lambda v: low <= v <= high)

        return cls(
            data_dir=Path(get("SELFCOG_DATA_DIR", "data")),
            cache_path=Path(get("SELFCOG_CACHE_DIR")) if get("SELFCOG_CACHE_DIR") else None,
            db_timeout_s=number("SELFCOG_DB_TIMEOUT_S", "15", high=24 * 3600),
            model=get("SELFCOG_MODEL", "embedded"),
            device=get("SELFCOG_DEVICE", "auto"),
            dtype=_parse(env, "SELFCOG_DTYPE", "auto", str.lower, "auto, bf16, fp16 or fp32",
                         lambda v: v in ("auto", "bf16", "fp16", "fp32")),
            eval_dtype=_parse(env, "SELFCOG_EVAL_DTYPE", "auto", str.lower, "auto, bf16, fp16 or fp32",
                              lambda v: v in ("auto", "bf16", "fp16", "fp32")),
            host=get("SELFCOG_HOST", "127.0.0.1"),
            port=whole("SELFCOG_PORT", "7860", 1, 65535),
            admin_password=get("SELFCOG_ADMIN_PASSWORD") or None,
            telegram_token=get("TELEGRAM_BOT_TOKEN") or None,
            telegram_api_url=get("TELEGRAM_API_URL") or None,
            admin_ids=_parse(env, "SELFCOG_ADMIN_IDS", "", _ids, "Telegram user ids separated by commas (12345,67890)"),
            max_new_tokens=whole("SELFCOG_MAX_NEW_TOKENS", "256", 1),
            engine=get("SELFCOG_ENGINE") or "local",
            trainer=_parse(env, "SELFCOG_TRAINER", "auto", str.lower, "auto, in-process or worker",
                           lambda v: v in ("auto", "in-process", "worker")),
            train_weights=_parse(env, "SELFCOG_TRAIN_WEIGHTS", "auto", str.lower, "auto, serving or copy",
                                 lambda v: v in ("auto", "serving", "copy")),
            prepare_ahead=_parse(env, "SELFCOG_PREPARE_AHEAD", "auto", str.lower, "auto, on or off",
                                 lambda v: v in ("auto", "on", "off")),
            chat_temperature=number("SELFCOG_CHAT_TEMPERATURE", "0.7", high=10),
            chat_top_p=number("SELFCOG_CHAT_TOP_P", "0.9", high=1),
            chat_repetition_penalty=number("SELFCOG_CHAT_REPETITION_PENALTY", "1.15", 1, 10),
            retrain_every_hours=number("SELFCOG_RETRAIN_EVERY_HOURS", "0", high=24 * 365),
            retrain_min_corrections=whole("SELFCOG_RETRAIN_MIN_CORRECTIONS", "5", 1),
            gate=GateThresholds(
                identity_product=number("SELFCOG_GATE_PRODUCT", str(GATE.identity_product), high=1),
                identity_other=number("SELFCOG_GATE_OTHER", str(GATE.identity_other), high=1),
                retention=number("SELFCOG_GATE_RETENTION", str(GATE.retention), high=1),
                bleed_share=number("SELFCOG_GATE_BLEED_SHARE", str(GATE.bleed_share), high=1),
                facts_drop=whole("SELFCOG_GATE_FACTS_DROP", str(GATE.facts_drop), 0, 1000),
            ),
        )

    def with_overrides(self, **values) -> "Settings":
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    @property
    def db_path(self) -> Path:
        return self.data_dir / "selfcog.db"

    @property
    def cache_dir(self) -> Path:
        return self.cache_path or self.data_dir / "cache"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"
