"""Settings: environment variables, overridden by command-line flags. Plain values, read once.

| variable                         | default     | what                                                       |
|----------------------------------|-------------|------------------------------------------------------------|
| SELFCOG_DATA_DIR                 | ./data      | SQLite file, model cache, adapters, run folders             |
| SELFCOG_CACHE_DIR                | DATA_DIR/cache | converted models, base-answer caches (shareable)       |
| SELFCOG_DB_TIMEOUT_S             | 15          | how long a write waits for another process's lock       |
| SELFCOG_MODEL                    | embedded    | 'embedded' (SmolLM2-135M-Instruct), a local HF folder or hub id |
| SELFCOG_DEVICE                   | auto        | cuda when present, else cpu                                 |
| SELFCOG_HOST / SELFCOG_PORT      | 127.0.0.1 / 7860 | where the web page listens                             |
| SELFCOG_ADMIN_PASSWORD           | (unset)     | admin page password; unset = a one-time token printed at start |
| TELEGRAM_BOT_TOKEN               | (unset)     | runs the Telegram bot when set                              |
| TELEGRAM_API_URL                 | (Telegram)  | another Bot API server (a local one, or the tests' fake)    |
| SELFCOG_ADMIN_IDS                | (none)      | Telegram user ids allowed admin commands, comma-separated   |
| SELFCOG_MAX_NEW_TOKENS           | 256         | longest reply, in tokens                                     |
| SELFCOG_RETRAIN_EVERY_HOURS      | 0 (off)     | scheduled retrain interval                                   |
| SELFCOG_RETRAIN_MIN_CORRECTIONS  | 5           | new approved corrections needed before a scheduled retrain  |
| SELFCOG_GATE_PRODUCT / _OTHER    | 0.9 / 0.8   | identity hit rate a candidate needs (product prompt / others) |
| SELFCOG_GATE_RETENTION           | 0.5         | general-answer retention a candidate needs (floor)           |
| SELFCOG_GATE_BLEED_TOLERANCE     | 1           | general answers that may newly mention the identity          |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path


def _ids(value: str) -> frozenset[int]:
    return frozenset(int(part) for part in value.replace(" ", "").split(",") if part)


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    cache_path: Path | None = None  # None: data_dir/cache
    db_timeout_s: float = 15.0
    model: str = "embedded"
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    admin_password: str | None = None
    telegram_token: str | None = None
    telegram_api_url: str | None = None
    admin_ids: frozenset[int] = field(default_factory=frozenset)
    max_new_tokens: int = 256
    retrain_every_hours: float = 0.0
    retrain_min_corrections: int = 5
    gate_product: float = 0.9
    gate_other: float = 0.8
    gate_retention: float = 0.5
    gate_bleed_tolerance: int = 1

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        env = os.environ if env is None else env
        get = env.get
        return cls(
            data_dir=Path(get("SELFCOG_DATA_DIR", "data")),
            cache_path=Path(get("SELFCOG_CACHE_DIR")) if get("SELFCOG_CACHE_DIR") else None,
            db_timeout_s=float(get("SELFCOG_DB_TIMEOUT_S", "15")),
            model=get("SELFCOG_MODEL", "embedded"),
            device=get("SELFCOG_DEVICE", "auto"),
            host=get("SELFCOG_HOST", "127.0.0.1"),
            port=int(get("SELFCOG_PORT", "7860")),
            admin_password=get("SELFCOG_ADMIN_PASSWORD") or None,
            telegram_token=get("TELEGRAM_BOT_TOKEN") or None,
            telegram_api_url=get("TELEGRAM_API_URL") or None,
            admin_ids=_ids(get("SELFCOG_ADMIN_IDS", "")),
            max_new_tokens=int(get("SELFCOG_MAX_NEW_TOKENS", "256")),
            retrain_every_hours=float(get("SELFCOG_RETRAIN_EVERY_HOURS", "0")),
            retrain_min_corrections=int(get("SELFCOG_RETRAIN_MIN_CORRECTIONS", "5")),
            gate_product=float(get("SELFCOG_GATE_PRODUCT", "0.9")),
            gate_other=float(get("SELFCOG_GATE_OTHER", "0.8")),
            gate_retention=float(get("SELFCOG_GATE_RETENTION", "0.5")),
            gate_bleed_tolerance=int(get("SELFCOG_GATE_BLEED_TOLERANCE", "1")),
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
