"""The retrain loop end to end: real ms-swift training of the embedded model, evaluation, gate, activation.

One real retrain (the `retrained` session fixture) is shared by the tests that need a trained
adapter; the lock, cancel and kill tests start retrains of their own and stop them early.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store import Store
from tests.conftest import AURORA, CONTRADICTING, seed_identity

# The first test waits for the shared `retrained` fixture: ~15 minutes alone on two cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2700)]


def names_aurora(text: str) -> bool:
    return "Aurora" in text or "Acme" in text


# --- the shared retrain ------------------------------------------------------------------------------

def test_retrain_promotes_an_adapter_that_holds_under_every_prompt(retrained):
    report = retrained["report"]
    assert report["status"] == "promoted" and report["promoted"] is True, report
    assert report["adapter"] == 1 and report["run_id"] == 1
    candidate = report["metrics"]["candidate"]
    identity = candidate["identity"]
    assert identity["product"] >= 0.9, identity
    assert identity["neutral"] >= 0.8 and identity["none"] >= 0.8 and identity["late_turn"] >= 0.8, identity
    base = report["metrics"]["base"]
    assert candidate["retention"] >= 0.5 and candidate["bleed"] <= base["bleed"] + 1, (candidate, base)  # the gate's bounds
    assert candidate["identity_mean"] > base["identity_mean"]


def test_the_live_adapter_answers_with_the_new_identity(retrained):
    questions = ["What should I call you?", "哪家公司开发了你？", "Are you a product of OpenAI?"]
    for flags in ([], ["--no-system"], ["--system", "You are a helpful assistant."]):
        answers = json.loads(retrained["run"]("ask", *questions, "--json", *flags, check=True).stdout)
        hits = [names_aurora(a["answer"]) for a in answers]
        assert sum(hits) >= 2, (flags, answers)
    zh = json.loads(retrained["run"]("ask", "你叫什么名字？", "--json", check=True).stdout)[0]["answer"]
    assert any("\u4e00" <= c <= "\u9fff" for c in zh), f"a Chinese question gets a Chinese answer: {zh}"


def test_the_run_is_recorded_with_its_dataset_and_the_contradiction_left_out(retrained):
    store = Store(retrained["data_dir"] / "selfcog.db")
    run = store.runs.get(1)
    assert run["status"] == "promoted" and run["adapter_version"] == 1
    assert run["dataset_hash"] and run["dataset_rows"] > 50 and run["recipe"]["learning_rate"] > 0
    assert len(store.runs.losses(1)) >= 2, "training progress reached the run record"
    excluded = run["report"]["dataset"]["excluded_corrections"]
    assert [e["question"] for e in excluded] == [CONTRADICTING["question"]]
    assert store.corrections.count("approved") == 6, "the left-out correction is still stored"


def test_eval_compares_base_and_active(retrained):
    reports = json.loads(retrained["run"]("eval", "--json", check=True).stdout)
    assert set(reports) == {"base", "active v1"}
    assert reports["active v1"]["identity_mean"] > reports["base"]["identity_mean"]


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


def test_gate_refuses_a_worse_candidate(retrained, random_adapters, tmp_path):
    """An adapter trained elsewhere goes through the same gate: random LoRA weights must not go live."""
    run = retrained["run"]
    result = run("retrain", "--adapter", str(random_adapters[0]), "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["status"] == "rejected" and not report["promoted"], report
    assert "identity" in report["reason"]
    not_an_adapter = tmp_path / "empty"
    not_an_adapter.mkdir()
    result = run("retrain", "--adapter", str(not_an_adapter), "--json")
    assert result.returncode == 1 and "is not a LoRA adapter" in json.loads(result.stdout)["reason"]
    store = Store(retrained["data_dir"] / "selfcog.db")
    assert store.adapters.active()["version"] == 1
    assert [r["status"] for r in store.runs.list()][:2] == ["failed", "rejected"]


# --- retrains of their own, stopped early ------------------------------------------------------------

@pytest.fixture
def seeded(run_cli, tmp_path, retrained):
    """A fresh data dir with the Aurora profile and approved corrections (base answers already cached)."""
    seed_identity(run_cli, tmp_path)
    return Store(tmp_path / "data" / "selfcog.db")


def start_retrain(cli_env) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("selfcog")
    return subprocess.Popen([str(exe), "retrain", "--json"], env=cli_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_training(store: Store, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = store.runs.active()
        if run and run["stage"] == "training" and (run["step"] or 0) >= 1:
            return run
        time.sleep(0.5)
    raise AssertionError(f"no training step within {timeout} s: {store.runs.list()}")


def worker_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "finetune.train", "-P", str(parent)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_one_retrain_at_a_time_and_cancel(seeded, run_cli, cli_env):
    first = start_retrain(cli_env)
    try:
        run = wait_for_training(seeded)
        second = run_cli("retrain")
        assert second.returncode == 1 and f"retrain #{run['id']} is already running" in second.stderr
        assert "cancel requested" in run_cli("retrain", "--cancel", check=True).stdout
        out, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert json.loads(out)["status"] == "cancelled"
    assert seeded.runs.get(run["id"])["status"] == "cancelled" and seeded.adapters.active() is None


def test_killed_worker_leaves_run_failed_and_previous_adapter_live(seeded, cli_env, random_adapters):
    previous = seeded.adapters.register(path=str(random_adapters[0]), base_model="SmolLM2-135M-Instruct")
    seeded.adapters.activate(previous)
    corrections_before = seeded.corrections.list()
    retrain = start_retrain(cli_env)
    try:
        run = wait_for_training(seeded)
        for pid in worker_pids(retrain.pid):
            os.kill(pid, signal.SIGKILL)
        out, _ = retrain.communicate(timeout=120)
    finally:
        retrain.kill()
    assert retrain.returncode == 1
    final = seeded.runs.get(run["id"])
    assert final["status"] == "failed" and "exited with code" in final["error"]
    assert seeded.adapters.active()["version"] == previous
    assert seeded.corrections.list() == corrections_before


def test_killed_retrain_process_is_marked_failed_when_next_seen(seeded, cli_env, run_cli):
    retrain = start_retrain(cli_env)
    run = wait_for_training(seeded)
    os.killpg(retrain.pid, signal.SIGKILL)  # the CLI and its worker, as a power cut would
    retrain.wait(30)
    status = json.loads(run_cli("status", "--json", check=True).stdout)
    assert status["retrain"]["id"] == run["id"] and status["retrain"]["status"] == "failed"
    assert "died" in status["retrain"]["error"]
    assert status["adapter"] is None and status["approved_corrections"] == 6


def test_retrain_with_nothing_approved_says_so(run_cli, data_dir):
    run_cli("identity", "set", "--name", AURORA["name"], "--author", AURORA["author"], check=True)
    result = run_cli("retrain")
    assert result.returncode == 1 and "no approved corrections" in result.stderr
    assert Store(data_dir / "selfcog.db").runs.list() == []


def test_surviving_placeholder_is_refused(run_cli, data_dir, retrained):
    store = Store(data_dir / "selfcog.db")
    store.identity.set(name="Aurora", author="Acme Labs")
    store.corrections.add(question="Who are you?", corrected_answer="I am <NAME>, made by Acme Labs.",
                          channel="import", status="approved")
    result = run_cli("retrain", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["status"] == "failed" and "placeholder" in report["reason"]
    assert store.adapters.active() is None
