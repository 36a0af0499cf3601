"""The retrain loop end to end: real ms-swift training of the embedded model, evaluation, gate, activation.

One real retrain (the `retrained` session fixture) is shared by the tests that need a trained
adapter. One test kills a real training worker mid-training; the lock, cancel and power-cut tests
stop retrains whose worker replays a short recorded log (tests/replay_worker.py), held at step 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.hardware import cpu_has_fast_bf16
from store import Store
from tests.conftest import REPO, make_lora_adapter, seed_identity
from tests.replay_worker import Replay, write_recording
from tests.scenario import CONTRADICTING, PROFILE

# The first test that uses the shared `retrained` fixture waits for it: ~10 minutes alone on two cores.
pytestmark = pytest.mark.timeout(3600)


def names_the_profile(text: str) -> bool:
    return PROFILE.name in text or PROFILE.author.split()[0] in text  # "Acme" alone names the maker too


# --- the shared retrain ------------------------------------------------------------------------------

@pytest.mark.slow
def test_retrain_promotes_an_adapter_that_holds_under_every_prompt(retrained):
    report = retrained["report"]
    assert report["status"] == "promoted" and report["promoted"] is True, report
    assert report["adapter"] == 1 and report["run_id"] == 1
    candidate = report["metrics"]["candidate"]
    identity = candidate["identity"]
    assert identity["product"] >= 0.9, identity
    assert identity["neutral"] >= 0.8 and identity["none"] >= 0.8 and identity["late_turn"] >= 0.8, identity
    # promoted means the gate found general answers kept (tests/finetune/test_evaluate.py tests its bounds)
    assert candidate["identity_mean"] > report["metrics"]["base"]["identity_mean"]


@pytest.mark.slow
def test_the_run_report_times_each_phase_and_they_add_up(retrained):
    report = retrained["report"]
    phases = report["phases"]
    assert list(phases) == ["dataset", "worker_start", "training", "evaluation", "swap"], phases
    assert all(seconds >= 0 for seconds in phases.values()) and phases["training"] > 0
    # the phases are the whole run but for bookkeeping between them (store writes, the heartbeat)
    assert sum(phases.values()) <= report["seconds"] + 0.5
    assert sum(phases.values()) >= 0.9 * report["seconds"], (phases, report["seconds"])
    # the training's own split: its steps, then saving the adapter and giving the weights back
    split = report["training_split"]
    assert split["steps"] > 0 and split["after_steps"] >= 0, split
    assert abs(split["steps"] + split["after_steps"] - phases["training"]) <= 0.3, (split, phases)


@pytest.mark.slow
def test_the_promoted_adapter_folder_describes_itself(retrained):
    store = Store(retrained["data_dir"] / "selfcog.db")
    folder = Path(store.adapters.get(1)["path"])
    assert folder.name == "v1"
    card = json.loads((folder / "selfcog.json").read_text(encoding="utf-8"))
    run = store.runs.get(1)
    assert card["version"] == 1 and card["run_id"] == 1 and card["dataset_sha256"] == run["dataset_hash"]
    assert card["profile"]["name"] == PROFILE.name and card["recipe"]["learning_rate"] > 0
    assert card["metrics"]["identity_mean"] == run["metrics"]["candidate"]["identity_mean"]


@pytest.mark.slow
def test_the_live_adapter_answers_with_the_new_identity(retrained):
    questions = ["What should I call you?", "哪家公司开发了你？", "Are you a product of OpenAI?"]
    for flags in ([], ["--no-system"], ["--system", "You are a helpful assistant."]):
        answers = json.loads(retrained["run"]("ask", *questions, "--json", *flags, check=True).stdout)
        hits = [names_the_profile(a["answer"]) for a in answers]
        assert sum(hits) >= 2, (flags, answers)
    zh = json.loads(retrained["run"]("ask", "你叫什么名字？", "--json", check=True).stdout)[0]["answer"]
    assert any("\u4e00" <= c <= "\u9fff" for c in zh), f"a Chinese question gets a Chinese answer: {zh}"


@pytest.mark.slow
def test_the_run_is_recorded_with_its_dataset_and_the_contradiction_left_out(retrained):
    store = Store(retrained["data_dir"] / "selfcog.db")
    run = store.runs.get(1)
    assert run["status"] == "promoted" and run["adapter_version"] == 1
    assert run["dataset_hash"] and run["dataset_rows"] > 50 and run["recipe"]["learning_rate"] > 0
    assert len(store.runs.losses(1)) >= 2, "training progress reached the run record"
    excluded = run["report"]["dataset"]["excluded_corrections"]
    assert [e["question"] for e in excluded] == [CONTRADICTING["question"]]
    assert store.corrections.count("approved") == 6, "the left-out correction is still stored"


@pytest.mark.slow
def test_eval_compares_base_and_active(retrained):
    reports = json.loads(retrained["run"]("eval", "--json", check=True).stdout)
    assert set(reports) == {"base", "active v1"}
    assert reports["active v1"]["identity_mean"] > reports["base"]["identity_mean"]
    table = retrained["run"]("eval", check=True).stdout  # the reports are cached now: no model work
    assert "identity: product" in table and "active v1" in table
    assert ("matrix products in bf16" in table) == cpu_has_fast_bf16(), table  # says how it was computed


@pytest.mark.slow
def test_rollback_and_activate_switch_the_answers(retrained):
    run = retrained["run"]
    trained = json.loads(run("ask", "Who are you?", "--json", check=True).stdout)[0]["answer"]
    base = json.loads(run("ask", "Who are you?", "--adapter", "base", "--json", check=True).stdout)[0]["answer"]
    assert trained != base
    try:
        assert "the base model is now live" in run("adapters", "rollback", check=True).stdout
        assert json.loads(run("ask", "Who are you?", "--json", check=True).stdout)[0]["answer"] == base
    finally:
        run("adapters", "activate", "1", check=True)
    assert json.loads(run("ask", "Who are you?", "--json", check=True).stdout)[0]["answer"] == trained
    listed = json.loads(run("adapters", "list", "--json", check=True).stdout)
    assert [(a["version"], a["active"]) for a in listed] == [(1, 1)]


@pytest.mark.slow
def test_gate_refuses_a_candidate_that_did_not_learn_the_identity(retrained, embedded_model, tmp_path):
    """An adapter trained elsewhere goes through the same gate. This one's random weights are small,
    so it answers like the base: it must not go live. (Its evaluation is the only one this test pays
    for: the base's and the live adapter's reports come from the cache the shared retrain filled.
    Random weights at full scale would run every answer to the token cap: 4x the time.)"""
    untaught = make_lora_adapter(embedded_model.path, tmp_path / "untaught", seed=1, lora_alpha=1)
    run = retrained["run"]
    result = run("retrain", "--adapter", str(untaught), "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["status"] == "rejected" and not report["promoted"], report
    assert report["reason"].startswith("Refused: identity under"), report["reason"]
    not_an_adapter = tmp_path / "empty"
    not_an_adapter.mkdir()
    result = run("retrain", "--adapter", str(not_an_adapter), "--json")
    assert result.returncode == 1 and "is not a LoRA adapter" in json.loads(result.stdout)["reason"]
    store = Store(retrained["data_dir"] / "selfcog.db")
    assert store.adapters.active()["version"] == 1
    assert [r["status"] for r in store.runs.list()][:2] == ["failed", "rejected"]


# --- retrains of their own, stopped early ------------------------------------------------------------

@pytest.fixture
def seeded(run_cli, tmp_path, base_answers_cached):
    """A fresh data dir with the scenario's profile and approved corrections (base answers already cached)."""
    seed_identity(run_cli, tmp_path)
    return Store(tmp_path / "data" / "selfcog.db")


@pytest.fixture
def held_replay(tmp_path) -> Replay:
    """A worker that replays a short recorded log and holds at step 1 until released or killed."""
    recorded = write_recording(tmp_path / "recorded", losses=[2.0, 1.5, 1.2], seconds_per_step=8.0)
    return Replay.holding(recorded, 1, tmp_path)


def start_retrain(cli_env, replay: Replay | None = None, args: tuple[str, ...] = ("--json",)) -> subprocess.Popen:
    """`selfcog retrain --json` in its own process group; with ``replay``, its training worker replays."""
    command = (replay.selfcog_command("retrain", *args) if replay
               else [str(Path(sys.executable).with_name("selfcog")), "retrain", *args])
    return subprocess.Popen(command, env=cli_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_training(store: Store, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = store.runs.active()
        if run and run["stage"] == "training" and (run["step"] or 0) >= 1:
            return run
        if run is None and store.runs.list():
            raise AssertionError(f"the retrain ended before training: {store.runs.list()[0]}")
        time.sleep(0.5)
    raise AssertionError(f"no training step within {timeout} s: {store.runs.list()}")


def worker_pids(parent: int, command: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", command, "-P", str(parent)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_killed_worker_leaves_run_failed_and_previous_adapter_live(seeded, cli_env, random_adapters):
    """The one test that kills real ms-swift training (a worker killed mid-step, as the OOM killer would):
    SELFCOG_TRAINER=worker, since training runs in the retrain's own process by default (a kill of that
    process is test_killed_retrain_process_is_marked_failed_when_next_seen)."""
    previous = seeded.adapters.register(path=str(random_adapters[0]), base_model="SmolLM2-135M-Instruct")
    seeded.adapters.activate(previous)
    corrections_before = seeded.corrections.list()
    retrain = start_retrain(cli_env | {"SELFCOG_TRAINER": "worker"})
    try:
        run = wait_for_training(seeded)
        workers = worker_pids(retrain.pid, "finetune.worker")
        assert workers, "the real ms-swift worker is training"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        out, _ = retrain.communicate(timeout=120)
    finally:
        retrain.kill()
    assert retrain.returncode == 1
    final = seeded.runs.get(run["id"])
    assert final["status"] == "failed" and "exited with code" in final["error"]
    assert seeded.adapters.active()["version"] == previous
    assert seeded.corrections.list() == corrections_before


def test_one_retrain_at_a_time_and_cancel(seeded, run_cli, cli_env, held_replay):
    first = start_retrain(cli_env, held_replay)
    try:
        run = wait_for_training(seeded)
        assert run["total_steps"] == 3, "the replayed log's steps reach the run record"
        second = run_cli("retrain")
        assert second.returncode == 1 and f"retrain #{run['id']} is already running" in second.stderr
        assert "cancel requested" in run_cli("retrain", "--cancel", check=True).stdout
        out, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert json.loads(out)["status"] == "cancelled"
    assert seeded.runs.get(run["id"])["status"] == "cancelled" and seeded.adapters.active() is None


def test_retrain_beside_a_running_server_hands_the_job_to_it_and_follows_it(
        seeded, cli_env, run_cli, held_replay, engine, embedded_model, data_dir, cache_dir, monkeypatch):
    """With `selfcog serve`'s job runner alive on the data (here in this test's process), `selfcog retrain`
    loads no model of its own: the runner trains (its pid owns the run), the command prints the progress
    and ends with the run's outcome."""
    import threading

    from finetune.jobs import JobRunner, JobSettings

    held_replay.install(monkeypatch)  # workers this process starts (the runner's) replay, held at step 1
    stop = threading.Event()
    runner = JobRunner(JobSettings(data_dir, cache_dir, trainer="worker"), seeded, model=embedded_model,
                       engine=engine, poll_s=0.2).start(stop)
    try:
        deadline = time.monotonic() + 60
        while not seeded.runs.runner_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        retrain = start_retrain(cli_env, args=())  # the real console script; it trains nothing itself
        try:
            run = wait_for_training(seeded)
            assert (run["trigger"], run["pid"]) == ("cli", os.getpid()), "the server's runner trains it"
            time.sleep(2)  # the command looks every 0.5 s: let it print step 1 before the cancel
            assert "cancel requested" in run_cli("retrain", "--cancel", check=True).stdout
            out, err = retrain.communicate(timeout=120)
        finally:
            retrain.kill()
    finally:
        stop.set()
        runner.join(timeout=120)
    assert retrain.returncode == 0, err
    assert f"Retrain #{run['id']}: handed to the running `selfcog serve`" in err
    assert f"Retrain #{run['id']}: training, step 1/3" in err, "the progress, as the runner records it"
    assert f"Retrain #{run['id']} cancelled; the live weights stay." in out
    assert seeded.runs.get(run["id"])["status"] == "cancelled" and seeded.adapters.active() is None


def test_killed_retrain_process_is_marked_failed_when_next_seen(seeded, cli_env, run_cli, held_replay):
    retrain = start_retrain(cli_env, held_replay)
    workers = []
    try:
        run = wait_for_training(seeded)
        workers = worker_pids(retrain.pid, "tests.replay_worker")
        os.killpg(retrain.pid, signal.SIGKILL)  # the retrain's process, as a power cut would
        retrain.wait(30)
        status = json.loads(run_cli("status", "--json", check=True).stdout)
    finally:
        retrain.kill()
        for pid in workers:  # the worker has a process group of its own: end the one this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert status["retrain"]["id"] == run["id"] and status["retrain"]["status"] == "failed"
    assert "died" in status["retrain"]["error"]
    assert status["adapter"] is None and status["approved_corrections"] == 6


def test_retrain_with_nothing_approved_says_so(run_cli, data_dir):
    run_cli("identity", "set", "--name", PROFILE.name, "--author", PROFILE.author, check=True)
    result = run_cli("retrain")
    assert result.returncode == 1 and "no approved corrections" in result.stderr
    assert Store(data_dir / "selfcog.db").runs.list() == []


def test_surviving_placeholder_is_refused(run_cli, data_dir, base_answers_cached):
    store = Store(data_dir / "selfcog.db")
    store.identity.set(name=PROFILE.name, author=PROFILE.author)
    store.corrections.add(question="Who are you?", corrected_answer="I am <NAME>, made by Acme Labs.",
                          channel="import", status="approved")
    result = run_cli("retrain", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["status"] == "failed" and "placeholder" in report["reason"]
    assert store.adapters.active() is None
