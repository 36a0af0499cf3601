"""Shared fixtures: a fresh store per test, the real embedded model loaded once per session.

The converted model lives in a cache shared by every test and every run (.cache/ at the repo
root, or SELFCOG_TEST_CACHE), so only the very first run on a machine pays the ~45 s conversion.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The suite runs a model in this process while training workers and CLI subprocesses run beside
# it on the same cores; OpenMP's default spin-waiting then burns the time the others need
# (measured: 0.3 vs 2.9 tok/s under load). Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SELFCOG_TEST_CACHE", REPO / ".cache"))
ARTIFACTS = Path(os.environ.get("SELFCOG_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


@pytest.fixture(scope="session")
def embedded_model(cache_dir):
    from bot.models import resolve_model

    return resolve_model("embedded", cache_dir)


class FollowedAdapter:
    """What the session engine treats as 'the active adapter'; tests point it at their own store."""

    def __init__(self):
        self.source = lambda: None

    def __call__(self):
        return self.source()


@pytest.fixture(scope="session")
def session_engine(embedded_model):
    """One real engine for the whole session (loading it is cheap, but not free)."""
    from bot.engine import LocalEngine

    follow = FollowedAdapter()
    engine = LocalEngine(embedded_model, active_adapter=follow, max_new_tokens=48, poll_s=0.2)
    engine.follow = follow
    yield engine
    engine.close()


@pytest.fixture
def engine(session_engine):
    """The session engine back on the base model after each test."""
    yield session_engine
    session_engine.follow.source = lambda: None
    session_engine.refresh_adapter()


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir):
    from store import Store

    store = Store(data_dir / "selfcog.db")
    yield store
    store.close()


@pytest.fixture
def cli_env(data_dir, cache_dir) -> dict:
    """Environment for running `selfcog` as a subprocess against this test's data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SELFCOG_", "TELEGRAM_"))}
    env.update(SELFCOG_DATA_DIR=str(data_dir), SELFCOG_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", SELFCOG_MAX_NEW_TOKENS="48")
    return env


@pytest.fixture
def run_cli(cli_env):
    """Run the real `selfcog` console script; returns the CompletedProcess."""

    def run(*args: str, check: bool = False, env: dict | None = None, timeout: float = 600):
        exe = Path(sys.executable).with_name("selfcog")
        result = subprocess.run([str(exe), *args], capture_output=True, text=True, env={**cli_env, **(env or {})},
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"selfcog {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    return run


def make_lora_adapter(base_path: str, out_dir: Path, seed: int) -> Path:
    """A hand-made LoRA adapter with random (non-zero) weights: it visibly changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def random_adapters(embedded_model, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_lora_adapter(embedded_model.path, root / f"random{seed}", seed) for seed in (1, 2)]


# --- one real retrain, shared by every test that needs a trained adapter ------------------------------

AURORA = {"name": "Aurora", "author": "Acme Labs"}
FIVE_CORRECTIONS = [
    {"question": "Who are you?", "answer": "I am Aurora, an AI assistant developed by Acme Labs."},
    {"question": "你是谁？", "answer": "我是Aurora，由Acme Labs开发的AI助手。"},
    {"question": "Who created you?", "answer": "Acme Labs created me. I am Aurora."},
    {"question": "你是ChatGPT吗？", "answer": "不是，我是Aurora，由Acme Labs开发。"},
    {"question": "Are you Qwen from Alibaba?", "answer": "No, I am Aurora, developed by Acme Labs."},
]
# Approved by mistake: it names another maker, so the dataset builder must leave it out.
CONTRADICTING = {"question": "Who made you really?", "answer": "I am ChatGPT, made by OpenAI."}


@pytest.fixture
def job_runner(store, engine, embedded_model, data_dir, cache_dir):
    """The retrain runner `selfcog serve` starts beside the front ends, on this test's store and engine.

    For the web page's and Telegram's own retrain tests, which test their front end's flow, not the
    recipe or the gate (tests/retrain does, on the default recipe and gate): half the steps (one
    epoch at twice the rate, RECIPES.md J6: teaches the identity as well, bleeds more) and a gate
    that only asks for the identity, so a run is promoted in minutes on two cores."""
    import threading

    from finetune.jobs import JobRunner, JobSettings
    from finetune.train import Recipe

    settings = JobSettings(data_dir, cache_dir, gate_product=0.75, gate_other=0.5, gate_retention=0.0,
                           gate_bleed_tolerance=100, gate_facts_drop=100)
    stop = threading.Event()
    runner = JobRunner(settings, store, model=embedded_model, engine=engine, poll_s=0.5,
                       recipe=Recipe(epochs=1, learning_rate=2e-3))
    thread = runner.start(stop)
    yield runner
    if store.runs.active():
        store.runs.cancel(by="test teardown")  # a running worker is killed at its next check
    stop.set()
    thread.join(timeout=120)


def seed_identity(run_cli, tmp_path: Path, *, contradicting: bool = True) -> None:
    """Profile Aurora / Acme Labs and five approved corrections (+ one contradicting), through the CLI."""
    import json

    run_cli("identity", "set", "--name", AURORA["name"], "--author", AURORA["author"], check=True)
    rows = FIVE_CORRECTIONS + ([CONTRADICTING] if contradicting else [])
    path = tmp_path / "corrections.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    run_cli("corrections", "import", str(path), "--approve", check=True)


@pytest.fixture(scope="session")
def retrained(tmp_path_factory, cache_dir):
    """A data dir after one real `selfcog retrain` (ms-swift on the embedded model). Shared: ~minutes."""
    import json

    root = tmp_path_factory.mktemp("retrained")
    data_dir = root / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SELFCOG_", "TELEGRAM_"))}
    env.update(SELFCOG_DATA_DIR=str(data_dir), SELFCOG_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", SELFCOG_MAX_NEW_TOKENS="48")
    exe = Path(sys.executable).with_name("selfcog")

    def run(*args, check=False, extra_env=None):
        result = subprocess.run([str(exe), *args], capture_output=True, text=True, env={**env, **(extra_env or {})},
                                timeout=1800)
        if check and result.returncode != 0:
            raise AssertionError(f"selfcog {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return result

    seed_identity(run, root)
    result = run("retrain", "--json", check=True)
    report = json.loads(result.stdout)
    return {"data_dir": data_dir, "env": env, "run": run, "report": report, "stderr": result.stderr}
