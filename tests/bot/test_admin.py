"""bot/admin.py: the one facade the web page, Telegram and the CLI read and act through (real store)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bot.admin import Admin
from bot.errors import UserError
from bot.run_summary import RunSummary
from store.runs import RetrainBusy


@pytest.fixture
def admin(store):
    return Admin(store)


def approve_one(admin):
    admin.add_correction("Who are you?", "I am Aurora.", by="test", approve=True)


def test_retrain_needs_an_approved_correction(admin, store):
    admin.add_correction("Who are you?", "I am Aurora.", by="test")  # pending only
    with pytest.raises(UserError, match="^no approved corrections: approve some first$"):
        admin.request_retrain("admin", "web")
    assert store.runs.list() == []


def test_a_retrain_request_says_whether_a_job_runner_will_pick_it_up(admin, store):
    approve_one(admin)
    run = admin.request_retrain("admin", "web")
    assert (run["status"], run["trigger"], run["requested_by"]) == ("queued", "web", "admin")
    assert run["waiting_for_runner"] is True
    with pytest.raises(RetrainBusy):
        admin.request_retrain("telegram:7", "telegram")
    admin.cancel_retrain(by="admin")
    store.runs.runner_heartbeat()  # a job runner in this process
    assert admin.request_retrain("admin", "web")["waiting_for_runner"] is False
    assert admin.current_run().outcome_line.endswith("starts as soon as the job runner picks it up.")


def test_current_run_marks_a_dead_run_failed(admin, store):
    approve_one(admin)
    run = admin.request_retrain("cli", "cli", claim=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.runs.update(run["id"], pid=gone.pid)
    summary = admin.current_run()
    assert isinstance(summary, RunSummary) and summary.status == "failed" and "died" in summary.outcome_line
    assert store.runs.get(run["id"])["status"] == "failed"


def test_overview_runs_and_losses(admin, store):
    assert admin.overview() == {"name": "Selfcog", "author": "the selfcog team", "description": "", "adapter": None,
                                "adapters": 0, "pending_corrections": 0, "approved_corrections": 0, "retrain": None,
                                "runner_alive": False}
    approve_one(admin)
    first = admin.request_retrain("cli", "cli", claim=True)
    store.runs.progress(first["id"], stage="training", step=1, total_steps=2, loss=2.0)
    store.runs.progress(first["id"], stage="training", step=2, total_steps=2, loss=1.5)
    store.runs.finish(first["id"], "rejected", report={"reasons": ["retention 0.30 < 0.50"]})
    second = admin.request_retrain("web", "web")
    assert [r.id for r in admin.runs(limit=5)] == [second["id"], first["id"]]
    assert admin.losses(first["id"]) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    overview = admin.overview()
    assert overview["approved_corrections"] == 1 and overview["retrain"].id == second["id"]


def test_set_identity_cleans_like_chat_input(admin, store):
    admin.set_identity(name="Au\x00rora \ud83d", author="Acme", description="")
    assert store.identity.current().name == "Aurora \ufffd"
    with pytest.raises(UserError, match="author is empty"):
        admin.set_identity(author=" \x00 ")


def test_import_is_all_or_nothing(admin, store):
    pairs = [("Who are you?", "I am Aurora.", 1), ("Who made you?", "Acme Labs.", 2), ("Why?", "x" * 5000, 7)]
    with pytest.raises(UserError, match=r"^in\.jsonl line 7: The answer is 5,000 characters long.*nothing was imported"):
        admin.import_corrections(pairs, by="cli", source="in.jsonl")
    assert store.corrections.count() == 0
    done = admin.import_corrections(pairs[:2] + pairs[:1], by="cli", approve=True)
    assert (done["added"], done["duplicates"], done["status"]) == (2, 1, "approved")


def test_an_adapter_folder_that_is_not_a_lora_is_not_activated(admin, store, tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 576)},
              folder / "adapter_model.safetensors")  # real weights: only the config is wrong
    version = store.adapters.register(path=str(folder), base_model="SmolLM2-135M-Instruct")
    with pytest.raises(UserError, match=f"^adapter v{version} cannot be activated: "):
        admin.activate(version, by="test")
    assert store.adapters.active() is None


def test_activation_and_rollback_swap_this_process_at_once(store, live_engine, embedded_model, random_adapters):
    admin = Admin(store, engine=live_engine, model=embedded_model)
    version = store.adapters.register(path=str(random_adapters[0]), base_model=embedded_model.name)
    admin.activate(version, by="test")
    assert live_engine.adapter_version == version  # no waiting for the engine's next poll
    admin.rollback(by="test")
    assert live_engine.adapter_version is None
