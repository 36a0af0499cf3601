"""Shared fixtures: a fresh store per test, the real embedded model loaded once per session, and one
real retrain per run (`retrained`) whose adapter every other retrain replays (`replay`, `job_runner`).

The converted model, the base model's answers and evaluation reports live in a cache shared by every
test and every run (.cache/ at the repo root, or SELFCOG_TEST_CACHE), so only the very first run on a
machine pays the ~45 s conversion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.replay_worker import Replay
from tests.scenario import CONTRADICTING, FIVE_CORRECTIONS, PROFILE

# The suite runs a model in this process while training workers, CLI subprocesses, servers and a
# browser run beside it on the same cores; OpenMP's spin-waiting then burns the time the others need
# (measured: 0.3 vs 2.9 tok/s under load), so here threads sleep at once (the product spins ~0.1 ms:
# bot/engines/local.py). Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "0")

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
    from bot.engines.local import LocalEngine

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
def live_engine(engine, store):
    """The session engine serving this test's store's live adapter, as `selfcog serve` would."""
    engine.follow.source = store.adapters.active
    engine.refresh_adapter()
    return engine


@pytest.fixture
def chat(store, live_engine):
    """The chat service both front ends use, on the real embedded model; short answers keep tests quick."""
    from bot.chat import ChatService

    return ChatService(store, live_engine, max_new_tokens=16)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir):
    from store import Store

    store = Store(data_dir / "selfcog.db")
    yield store
    store.close()


def selfcog_env(data_dir: Path, cache_dir: Path) -> dict:
    """Environment for running `selfcog` as a subprocess against a data dir (nothing from the caller's settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SELFCOG_", "TELEGRAM_"))}
    env.update(SELFCOG_DATA_DIR=str(data_dir), SELFCOG_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", SELFCOG_MAX_NEW_TOKENS="48")
    return env


def selfcog_runner(base_env: dict):
    """run(*args, check=False, env=None, timeout=600) runs the real `selfcog` console script; returns the CompletedProcess."""

    def run(*args: str, check: bool = False, env: dict | None = None, timeout: float = 600):
        exe = Path(sys.executable).with_name("selfcog")
        result = subprocess.run([str(exe), *args], capture_output=True, text=True, env={**base_env, **(env or {})},
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"selfcog {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    return run


@pytest.fixture
def cli_env(data_dir, cache_dir) -> dict:
    """Environment for running `selfcog` as a subprocess against this test's data dir."""
    return selfcog_env(data_dir, cache_dir)


@pytest.fixture
def run_cli(cli_env):
    """Run the real `selfcog` console script on this test's data dir; returns the CompletedProcess."""
    return selfcog_runner(cli_env)


def make_lora_adapter(base_path: str, out_dir: Path, seed: int, lora_alpha: int = 64) -> Path:
    """A hand-made LoRA adapter with random (non-zero) weights: it visibly changes the answers
    (lora_alpha=1: barely, the answers stay close to the base's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def random_adapters(embedded_model, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_lora_adapter(embedded_model.path, root / f"random{seed}", seed) for seed in (1, 2)]


@pytest.fixture
def corrupt_adapter(tmp_path) -> Path:
    """A folder that looks like an adapter but is none: an empty config and weights that aren't safetensors."""
    folder = tmp_path / "corrupt-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return folder


@pytest.fixture(scope="session")
def base_answers_cached(session_engine, embedded_model, cache_dir) -> list[dict]:
    """The base model's general answers, computed once into the shared cache: a retrain's dataset
    stage then starts at once (the tests that stop a retrain early, or refuse its dataset, need no more)."""
    from finetune.jobs import general_answers

    return general_answers(session_engine, embedded_model, cache_dir)


@pytest.fixture
def small_evaluation(monkeypatch) -> tuple[int, int]:
    """A retrain in this process evaluates on every 8th identity probe and every 11th eval prompt (4 and 4:
    28 answers a report instead of 260), for tests about what happens around an evaluation, not its scores.
    The full evaluation of an adapter that barely trained runs every answer to the token cap: ~100 s a report
    on two cores. Returns (probes, eval prompts)."""
    from finetune import jobs

    probes, general = jobs.load_probes()[::8], jobs.load_general_prompts
    monkeypatch.setattr(jobs, "load_probes", lambda: probes)
    monkeypatch.setattr(jobs, "load_general_prompts", lambda split=None: general(split)[::11] if split == "eval" else general(split))
    return len(probes), len(jobs.load_general_prompts("eval"))


def seed_identity(run_cli, tmp_path: Path, *, contradicting: bool = True) -> None:
    """The scenario's profile and five approved corrections (+ one contradicting), through the CLI."""
    rows = FIVE_CORRECTIONS + ([CONTRADICTING] if contradicting else [])
    path = tmp_path / "corrections.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    run_cli("identity", "set", "--name", PROFILE.name, "--author", PROFILE.author, check=True)
    run_cli("corrections", "import", str(path), "--approve", check=True)


# --- one real retrain, shared by every test that needs a trained adapter ------------------------------
#
# It starts in the background as soon as the session's first test runs (`selfcog retrain` in its own
# process), and the tests that need it run last: the suite's other tests leave half of the two cores
# idle (browsers, servers and subprocesses waiting), which the training uses meanwhile.

def pytest_collection_modifyitems(config, items):
    """Order: the rest, then what needs the shared retrain, then the browser tests (Playwright's sync API
    keeps an event loop in the main thread that asyncio.run() in a later test would trip over)."""
    items.sort(key=lambda item: ("browser" in item.keywords, "retrained" in item.fixturenames
                                 or "replay" in item.fixturenames or "job_runner" in item.fixturenames))


class BackgroundRetrain:
    """`selfcog retrain --json` on a seeded data dir, running beside the tests until someone waits for it."""

    def __init__(self, root: Path, cache_dir: Path):
        self.root, self.data_dir = root, root / "data"
        self.run = selfcog_runner(selfcog_env(self.data_dir, cache_dir))
        seed_identity(self.run, root)
        self.stdout, self.stderr = root / "retrain.out", root / "retrain.err"
        exe = Path(sys.executable).with_name("selfcog")
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen([str(exe), "retrain", "--json"], stdout=out, stderr=err,
                                            env=selfcog_env(self.data_dir, cache_dir))

    def wait(self, timeout: float = 3600) -> dict:
        code = self.process.wait(timeout=timeout)
        stderr = self.stderr.read_text()
        if code != 0:
            raise AssertionError(f"selfcog retrain failed ({code}):\n{stderr[-3000:]}")
        report = json.loads(self.stdout.read_text())
        return {"data_dir": self.data_dir, "run": self.run, "report": report, "stderr": stderr,
                "train_dir": self.data_dir / "runs" / str(report["run_id"]) / "train"}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session", autouse=True)
def background_retrain(request, tmp_path_factory, cache_dir):
    """Starts the shared retrain at the session's start when any selected test needs it; else nothing."""
    if not any("retrained" in item.fixturenames for item in request.session.items):
        yield None
        return
    request.getfixturevalue("embedded_model")  # converted once here, not by two processes at a time
    retrain = BackgroundRetrain(tmp_path_factory.mktemp("retrained"), cache_dir)
    yield retrain
    retrain.stop()


@pytest.fixture(scope="session")
def retrained(background_retrain) -> dict:
    """A data dir after one real `selfcog retrain` (ms-swift on the embedded model, default recipe and
    gate). The suite's only real training: ~8 minutes alone on two cores, started at the session's start.

    ``train_dir`` is that run's training folder (ms-swift's log and adapter), which the replay worker
    replays for the retrains the other tests start."""
    return background_retrain.wait()


@pytest.fixture
def replay(retrained, tmp_path, monkeypatch) -> Replay:
    """Training workers started by this process replay the shared retrain, holding after step 1
    until the test calls ``replay.release()``: the test sees the progress, then the run goes on."""
    replay = Replay.holding(retrained["train_dir"], 1, tmp_path)
    replay.install(monkeypatch)
    return replay


@pytest.fixture
def job_runner(replay, store, engine, embedded_model, data_dir, cache_dir):
    """The retrain runner `selfcog serve` starts beside the front ends, on this test's store and engine.

    Everything is real (dataset, default recipe, evaluation, gate, activation, hot swap) except the
    training, which replays the shared retrain (``replay``) and so returns its adapter."""
    import threading

    from finetune.jobs import JobRunner, JobSettings

    stop = threading.Event()
    runner = JobRunner(JobSettings(data_dir, cache_dir, trainer="worker"),  # the replay is a worker process
                       store, model=embedded_model, engine=engine, poll_s=0.5)
    thread = runner.start(stop)
    yield runner
    if store.runs.active():
        store.runs.cancel(by="test teardown")  # a running worker is killed at its next check
    stop.set()
    thread.join(timeout=120)
