import json
import os
import re
import sys
import textwrap

import pytest

from bot.models import ResolvedModel
from finetune import train
from finetune.train import (
    EVENTS_FD_ENV,
    Recipe,
    TrainingCancelled,
    TrainingError,
    recipe_for,
    swift_sft_args,
    template_default_system,
    train_adapter,
)
from tests.replay_worker import Replay, write_recording

@pytest.fixture
def tiny_model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 30}))
    return ResolvedModel(str(folder), "tiny", "llama", "chatml")


def flag(args, name):
    return args[args.index(name) + 1]


def test_recipe_for_picks_by_device(tiny_model):
    cpu, gpu = recipe_for(tiny_model, "cpu"), recipe_for(tiny_model, "cuda:0")
    assert cpu.dtype == "float32" and gpu.dtype == "bfloat16"
    assert not cpu.gradient_checkpointing and not gpu.gradient_checkpointing
    assert gpu.batch_size > cpu.batch_size


def test_swift_args_are_offline_and_explicit(tiny_model):
    args = swift_sft_args(tiny_model, "d.jsonl", "out", Recipe(batch_size=4, grad_accum=1), "You are SmolLM")
    assert flag(args, "--tuner_type") == "lora"
    assert flag(args, "--check_model") == "false"
    assert flag(args, "--gradient_checkpointing") == "false"
    assert flag(args, "--gradient_accumulation_steps") == "1"  # ms-swift would pick 16 / batch_size
    assert flag(args, "--model_type") == "llama" and flag(args, "--template") == "chatml"
    assert flag(args, "--system") == "You are SmolLM"
    assert "selfcog_progress" in args


def test_top_layers_become_a_target_regex(tiny_model):
    args = swift_sft_args(tiny_model, "d", "o", Recipe(lora_top_layers=2, lora_targets=("q_proj", "v_proj")), None)
    pattern = re.compile(flag(args, "--target_regex"))
    assert pattern.fullmatch("model.layers.29.self_attn.q_proj")
    assert pattern.fullmatch("base_model.model.model.layers.28.self_attn.v_proj")
    assert not pattern.fullmatch("model.layers.27.self_attn.q_proj")
    assert not pattern.fullmatch("model.layers.29.mlp.up_proj")
    assert "--target_modules" not in args and "--system" not in args


def test_default_system_read_from_the_chat_template(embedded_model):
    assert template_default_system(embedded_model.path) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def fake_worker(monkeypatch, tmp_path, body):
    """Replace the ms-swift worker by a small script, to test the process plumbing in milliseconds.

    Like the real worker it waits for the job on stdin (receive_job), so ``job`` is the job dict."""
    script = tmp_path / "worker.py"
    preamble = (f"import json, os, sys\nfrom finetune.train import receive_job\njob = receive_job()\n"
                f"events = os.fdopen(int(os.environ[{EVENTS_FD_ENV!r}]), 'w', buffering=1)\n")
    script.write_text(preamble + textwrap.dedent(body))
    monkeypatch.setattr(train, "_worker_command", lambda: [sys.executable, str(script)])


def test_progress_flows_and_the_adapter_comes_back(monkeypatch, tmp_path, tiny_model):
    fake_worker(monkeypatch, tmp_path, """
        print("Train:  50%|#####     | 1/2", end="\\r", flush=True)  # tqdm writes no newline
        for step in (0, 1, 2):
            events.write(json.dumps({"event": "progress", "step": step, "total_steps": 2, "loss": 1.0 / (step + 1), "eta_s": 2 - step}) + "\\n")
        events.write(json.dumps({"event": "done", "adapter": job["output_dir"] + "/checkpoint-2", "global_step": 2}) + "\\n")
    """)
    seen = []
    adapter = train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe(), on_progress=lambda *a: seen.append(a))
    assert adapter == (tmp_path / "out" / "checkpoint-2").resolve()
    assert [s[0] for s in seen] == [0, 1, 2] and seen[-1] == (2, 2, 1 / 3, 0)
    assert "Train:  50%" in (tmp_path / "out" / "worker.log").read_text()
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["recipe"]["learning_rate"] == Recipe().learning_rate


def test_worker_crash_raises_with_the_log_tail(monkeypatch, tmp_path, tiny_model):
    fake_worker(monkeypatch, tmp_path, """
        print("loading model", flush=True)
        sys.exit("ValueError: the dataset is empty")
    """)
    with pytest.raises(TrainingError, match="the dataset is empty") as info:
        train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe())
    assert "code 1" in str(info.value)


def test_cancel_kills_the_worker(monkeypatch, tmp_path, tiny_model):
    fake_worker(monkeypatch, tmp_path, """
        import signal
        print(f"pid {os.getpid()}", flush=True)
        events.write(json.dumps({"event": "progress", "step": 1, "total_steps": 9}) + "\\n")
        signal.pause()  # "training" until killed
    """)
    seen = []
    with pytest.raises(TrainingCancelled):
        train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe(),
                      on_progress=lambda *a: seen.append(a), should_cancel=lambda: bool(seen))
    pid = int((tmp_path / "out" / "worker.log").read_text().split()[1])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped


def test_warm_worker_is_started_ahead_and_the_next_only_when_asked(monkeypatch, tmp_path, tiny_model):
    fake_worker(monkeypatch, tmp_path, """
        events.write(json.dumps({"event": "done", "adapter": job["output_dir"], "global_step": 1}) + "\\n")
    """)
    warm = train.WarmWorkers(prestart=True)
    first = warm.waiting_pid()
    assert first is not None, "a worker is waiting before any job"
    try:
        train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out1", Recipe(), warm=warm)
        assert (tmp_path / "out1" / "worker.log").exists()
        assert warm.waiting_pid() is None, "no second worker starts beside the training"
        warm.prepare()
        second = warm.waiting_pid()
        assert second is not None and second != first, "the next one warms up when asked"
        train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out2", Recipe(), warm=warm)
        assert warm.waiting_pid() is None
    finally:
        warm.close()


def test_train_gpus_setting_reaches_the_worker(monkeypatch, tmp_path, tiny_model):
    """SELFCOG_TRAIN_GPUS=1: the worker trains on GPU 1 while serving keeps GPU 0."""
    fake_worker(monkeypatch, tmp_path, """
        print("CUDA_VISIBLE_DEVICES=" + os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"), flush=True)
        events.write(json.dumps({"event": "done", "adapter": job["output_dir"] + "/checkpoint-1", "global_step": 1}) + "\\n")
    """)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv(train.TRAIN_GPUS_ENV, "1")
    train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe())
    assert "CUDA_VISIBLE_DEVICES=1" in (tmp_path / "out" / "worker.log").read_text()
    monkeypatch.delenv(train.TRAIN_GPUS_ENV)
    train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out2", Recipe())
    assert "CUDA_VISIBLE_DEVICES=0" in (tmp_path / "out2" / "worker.log").read_text()


def test_replay_worker_replays_a_recorded_run_and_holds_where_asked(monkeypatch, tmp_path, tiny_model):
    """tests/replay_worker.py, which the front-end retrain tests train with, speaks the worker protocol."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    recorded = write_recording(tmp_path / "recorded", losses=[2.0, 1.5, 1.2], seconds_per_step=8.0, adapter=adapter)
    replay = Replay.holding(recorded, 2, tmp_path)
    replay.install(monkeypatch)
    seen = []

    def on_progress(*progress):
        seen.append(progress)
        if progress[0] == 2:
            replay.release()  # the worker waits here until released

    trained = train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe(), on_progress=on_progress)
    assert seen == [(0, 3, None, None), (1, 3, 2.0, 16.0), (2, 3, 1.5, 8.0), (3, 3, 1.2, 0.0)]
    assert trained == (tmp_path / "out" / "checkpoint-3").resolve()
    assert (trained / "adapter_config.json").read_text() == '{"r": 8}'
    assert "holding at step 2" in (tmp_path / "out" / "worker.log").read_text()
