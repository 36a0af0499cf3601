import json
import os
import re
import sys
import select
import textwrap
from dataclasses import replace

import pytest

from bot.errors import UserError
from bot.models import ResolvedModel
from finetune import train
from finetune import worker
from finetune.train import (
    Recipe,
    TrainingCancelled,
    TrainingError,
    recipe_for,
    swift_sft_args,
    template_default_system,
    train_adapter,
)
from finetune.worker import EVENTS_FD_ENV
from tests.replay_worker import Replay, write_recording

@pytest.fixture
def tiny_model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 30}))
    return ResolvedModel(str(folder), "tiny", "llama", "chatml")


def flag(args, name):
    return args[args.index(name) + 1]


def test_recipe_for_picks_by_device(monkeypatch, tiny_model):
    """CPU: the small recipe; a big GPU: one big batch a step; a GPU under 40 GiB (or capped below it):
    the same steps in micro-batches with gradient checkpointing."""
    monkeypatch.delenv(train.TRAIN_DTYPE_ENV, raising=False)
    monkeypatch.setattr(train, "cpu_has_fast_bf16", lambda flags=None: False)
    card = {"bytes": 141 * 2**30}
    monkeypatch.setattr(train, "gpu_memory_bytes", lambda device: card["bytes"])
    cpu, gpu = recipe_for(tiny_model, "cpu"), recipe_for(tiny_model, "cuda:0")
    assert gpu == train.GPU
    assert cpu.dtype == "float32" and gpu.dtype == "bfloat16"
    assert not cpu.gradient_checkpointing and not gpu.gradient_checkpointing
    assert gpu.batch_size > cpu.batch_size
    card["bytes"] = 24 * 2**30
    small = recipe_for(tiny_model, "cuda:0")
    assert small == train.GPU_SMALL_MEMORY and small.gradient_checkpointing and small.dtype == "bfloat16"
    assert small.batch_size * small.grad_accum == gpu.batch_size * gpu.grad_accum, "the same steps"
    assert small.batch_size < gpu.batch_size


def test_a_gpu_memory_cap_picks_the_small_gpu_recipe(monkeypatch, tiny_model):
    """SELFCOG_GPU_MEMORY_GB=24 on a big card: recipe_for sees a 24 GB card."""
    from bot import hardware

    class Props:
        total_memory = 141 * 2**30

    monkeypatch.setattr("torch.cuda.get_device_properties", lambda device: Props())
    monkeypatch.delenv(hardware.GPU_MEMORY_ENV, raising=False)
    assert hardware.gpu_memory_bytes("cuda:0") == 141 * 2**30
    assert recipe_for(tiny_model, "cuda:0") == train.GPU
    monkeypatch.setenv(hardware.GPU_MEMORY_ENV, "24")
    assert hardware.gpu_memory_bytes("cuda:0") == 24 * 2**30
    assert recipe_for(tiny_model, "cuda:0") == train.GPU_SMALL_MEMORY
    monkeypatch.setenv(hardware.GPU_MEMORY_ENV, "500")
    assert hardware.gpu_memory_bytes("cuda:0") == 141 * 2**30, "a cap above the card is the card"


def test_swift_args_are_offline_and_explicit(tiny_model):
    args = swift_sft_args(tiny_model, "d.jsonl", "out", Recipe(batch_size=4, grad_accum=1), "You are SmolLM")
    assert flag(args, "--tuner_type") == "lora"
    assert flag(args, "--check_model") == "false"
    assert flag(args, "--gradient_checkpointing") == "false"
    assert flag(args, "--gradient_accumulation_steps") == "1"  # ms-swift would pick 16 / batch_size
    assert flag(args, "--model_type") == "llama" and flag(args, "--template") == "chatml"
    assert flag(args, "--system") == "You are SmolLM"
    assert "--callbacks" not in args  # run_job adds its progress callback: these args also work by hand


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
    preamble = (f"import json, os, sys\nfrom finetune.worker import receive_job\njob = receive_job()\n"
                f"events = os.fdopen(int(os.environ[{EVENTS_FD_ENV!r}]), 'w', buffering=1)\n")
    script.write_text(preamble + textwrap.dedent(body))
    monkeypatch.setattr(worker, "_worker_command", lambda: [sys.executable, str(script)])


def test_progress_flows_and_the_adapter_comes_back(monkeypatch, tmp_path, tiny_model):
    fake_worker(monkeypatch, tmp_path, """
        print("Train:  50%|#####     | 1/2", end="\\r", flush=True)  # tqdm writes no newline
        for step in (0, 1, 2):
            events.write(json.dumps({"event": "progress", "step": step, "total_steps": 2, "loss": 1.0 / (step + 1), "eta_s": 2 - step}) + "\\n")
        events.write(json.dumps({"event": "done", "adapter": job["output_dir"] + "/checkpoint-2", "global_step": 2}) + "\\n")
    """)
    seen = []
    adapter = train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe(), on_progress=lambda *a: seen.append(a),
                            trainer="worker")
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
        train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe(), trainer="worker")
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
                      on_progress=lambda *a: seen.append(a), should_cancel=lambda: bool(seen), trainer="worker")
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
        train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out1", Recipe(), warm=warm, trainer="worker")
        assert (tmp_path / "out1" / "worker.log").exists()
        assert warm.waiting_pid() is None, "no second worker starts beside the training"
        warm.prepare()
        second = warm.waiting_pid()
        assert second is not None and second != first, "the next one warms up when asked"
        train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out2", Recipe(), warm=warm, trainer="worker")
        assert warm.waiting_pid() is None
    finally:
        warm.close()


def test_train_gpus_setting_reaches_the_worker(monkeypatch, tmp_path, tiny_model):
    """SELFCOG_TRAIN_GPUS=1: a worker trains on GPU 1 while serving keeps GPU 0, also with the in-process default
    (which would train on the serving GPU)."""
    fake_worker(monkeypatch, tmp_path, """
        print("CUDA_VISIBLE_DEVICES=" + os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"), flush=True)
        events.write(json.dumps({"event": "done", "adapter": job["output_dir"] + "/checkpoint-1", "global_step": 1}) + "\\n")
    """)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv(worker.TRAIN_GPUS_ENV, "1")
    train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe(), device="cuda:0")
    assert "CUDA_VISIBLE_DEVICES=1" in (tmp_path / "out" / "worker.log").read_text()
    monkeypatch.delenv(worker.TRAIN_GPUS_ENV)
    train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out2", Recipe(), trainer="worker")
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

    trained = train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe(), on_progress=on_progress,
                            trainer="worker")
    assert seen == [(0, 3, None, None), (1, 3, 2.0, 16.0), (2, 3, 1.5, 8.0), (3, 3, 1.2, 0.0)]
    assert trained == (tmp_path / "out" / "checkpoint-3").resolve()
    assert (trained / "adapter_config.json").read_text() == '{"r": 8}'
    assert "holding at step 2" in (tmp_path / "out" / "worker.log").read_text()


# ---------------------------------------------------------------- the CPU recipe's dtype


def test_bf16_is_read_from_the_cpu_flags(monkeypatch):
    assert train.cpu_has_fast_bf16("flags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni")  # AMD EPYC (Zen 4)
    assert train.cpu_has_fast_bf16("flags\t\t: fpu avx512f amx_bf16 amx_tile")  # Intel Sapphire Rapids
    assert not train.cpu_has_fast_bf16("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni")
    assert not train.cpu_has_fast_bf16("")
    from bot import hardware

    assert train.cpu_has_fast_bf16 is hardware.cpu_has_fast_bf16
    cpuinfo = open("/proc/cpuinfo").read()
    assert hardware.cpu_has_fast_bf16() == hardware.cpu_has_fast_bf16(cpuinfo), "no argument: this machine's flags"


def test_cpu_dtype_is_bf16_where_the_flags_offer_it_for_the_in_process_trainer_and_asked_wins(monkeypatch, tiny_model):
    """In-process training on a CPU with bf16 instructions runs under bf16 autocast, elsewhere fp32; the worker
    (`swift sft`, bf16 weights without autocast, quality unmeasured) stays fp32; SELFCOG_TRAIN_DTYPE always wins."""
    bf16_cpu, old_cpu = "flags : avx512f avx512_bf16", "flags : avx2 avx512f"
    monkeypatch.delenv(train.TRAIN_DTYPE_ENV, raising=False)
    assert train.BF16_WHEN_THE_CPU_HAS_IT
    assert (train.cpu_dtype(bf16_cpu), train.cpu_dtype(old_cpu)) == ("bfloat16", "float32")
    assert train.cpu_dtype(bf16_cpu, in_process=False) == "float32"
    monkeypatch.setattr(train, "cpu_has_fast_bf16", lambda flags=None: True)
    assert recipe_for(tiny_model, "cpu").dtype == "bfloat16"
    assert recipe_for(tiny_model, "cpu", "in-process").dtype == "bfloat16"
    assert recipe_for(tiny_model, "cpu", "worker").dtype == "float32"
    monkeypatch.setattr(train, "cpu_has_fast_bf16", lambda flags=None: False)
    assert recipe_for(tiny_model, "cpu").dtype == "float32"
    monkeypatch.setattr(train, "BF16_WHEN_THE_CPU_HAS_IT", False)  # the switch: off, the flags do not matter
    assert train.cpu_dtype(bf16_cpu) == "float32"
    monkeypatch.setenv(train.TRAIN_DTYPE_ENV, "float32")
    assert train.cpu_dtype(bf16_cpu) == "float32"
    monkeypatch.setenv(train.TRAIN_DTYPE_ENV, "bfloat16")
    assert train.cpu_dtype(old_cpu) == "bfloat16"
    assert recipe_for(tiny_model, "cpu").dtype == "bfloat16"
    assert recipe_for(tiny_model, "cpu", "worker").dtype == "bfloat16"
    monkeypatch.setattr(train, "gpu_memory_bytes", lambda device: 80 * 2**30)
    assert recipe_for(tiny_model, "cuda").dtype == "bfloat16"
    monkeypatch.setenv(train.TRAIN_DTYPE_ENV, "fp8")
    with pytest.raises(UserError, match="SELFCOG_TRAIN_DTYPE must be float32 or bfloat16, not 'fp8'"):
        recipe_for(tiny_model, "cpu")


def test_auto_trains_in_process_and_a_named_trainer_is_kept():
    assert train.resolve_trainer("auto") == train.resolve_trainer("in-process") == "in-process"
    assert train.resolve_trainer("worker") == "worker"


# ---------------------------------------------------------------- in this process (the default on a GPU)


def fake_train_here(monkeypatch, body):
    """Replace finetune.in_process.train_here (what train_adapter calls by default) by ``body``; returns its calls."""
    from finetune import in_process

    calls = []

    def fake(model, dataset_path, output_dir, recipe, **kwargs):
        calls.append({"model": model, "dataset": dataset_path, "out": output_dir, "recipe": recipe, **kwargs})
        return body(output_dir, **kwargs)

    monkeypatch.setattr(in_process, "train_here", fake)
    return calls


def test_training_runs_in_this_process_by_default_on_a_gpu(monkeypatch, tmp_path, tiny_model):
    """No worker starts: train_here gets the weights lent (or None), the device and the callbacks."""
    monkeypatch.delenv(worker.TRAIN_GPUS_ENV, raising=False)
    monkeypatch.setattr(worker, "_worker_command", lambda: pytest.fail("a worker was started"))

    def body(out, on_progress, **_):
        on_progress(1, 1, 0.5, 0.0)
        return out / "checkpoint-1"

    calls = fake_train_here(monkeypatch, body)
    seen, lent, cancel = [], object(), lambda: False
    adapter = train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe(), on_progress=lambda *a: seen.append(a),
                            should_cancel=cancel, lent=lent, device="cuda:0")
    assert adapter == (tmp_path / "out" / "checkpoint-1").resolve() and seen == [(1, 1, 0.5, 0.0)]
    assert calls[0]["lent"] is lent and calls[0]["device"] == "cuda:0" and calls[0]["should_cancel"] is cancel
    assert calls[0]["dataset"] == (tmp_path / "d.jsonl").resolve()


def test_in_process_cancel_and_failure_raise_what_the_worker_path_raises(monkeypatch, tmp_path, tiny_model):
    """Cancelled becomes TrainingCancelled; any other error (torch's out-of-memory too) a TrainingError: the caller
    (run_retrain) handles both paths alike."""
    from finetune.in_process import Cancelled

    monkeypatch.delenv(worker.TRAIN_GPUS_ENV, raising=False)

    def cancelled(out, **_):
        raise Cancelled("training cancelled")

    fake_train_here(monkeypatch, cancelled)
    with pytest.raises(TrainingCancelled):
        train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe(), trainer="in-process")

    def out_of_memory(out, **_):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fake_train_here(monkeypatch, out_of_memory)
    with pytest.raises(TrainingError, match="RuntimeError: CUDA out of memory"):
        train_adapter(tiny_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe(), trainer="in-process")


# ---------------------------------------------------------------- several GPUs: ms-swift's launcher


def test_several_gpus_run_swift_sft_under_torchrun(monkeypatch, tiny_model):
    monkeypatch.setenv(worker.TRAIN_GPUS_ENV, " 0, 1")
    gpus = worker.training_gpus()
    assert gpus == ["0", "1"]
    recipe = train.GPU
    argv, env = train.multi_gpu_command(tiny_model, "/d.jsonl", "/out", recipe, gpus, port=29555, default_system="S")
    assert argv[:4] == [sys.executable, "-m", "swift.cli.main", "sft"]
    assert flag(argv, "--per_device_train_batch_size") == str(recipe.batch_size // 2), "the global batch stays"
    assert argv[4:] == swift_sft_args(tiny_model, "/d.jsonl", "/out", replace(recipe, batch_size=16), "S")
    assert env == {"NPROC_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1", "MASTER_PORT": "29555",
                   "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    _, three = train.multi_gpu_command(tiny_model, "d", "o", replace(recipe, batch_size=8), ["0", "1", "2"], port=1,
                                       default_system=None)
    assert three["NPROC_PER_NODE"] == "3"
    # ms-swift's launcher turns exactly these variables into torchrun's arguments
    from swift.cli import main as swift_cli

    monkeypatch.delenv("NNODES", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert swift_cli.get_torchrun_args() == ["--nproc_per_node", "2", "--master_port", "29555"]
    assert swift_cli.ROUTE_MAPPING["sft"] == "swift.cli.sft"


def test_no_worker_waits_when_several_gpus_train(monkeypatch, tmp_path):
    fake_worker(monkeypatch, tmp_path, "")
    monkeypatch.setenv(worker.TRAIN_GPUS_ENV, "0,1")
    warm = worker.WarmWorkers(prestart=True)
    try:
        assert warm.waiting_pid() is None, "ms-swift's launcher trains: a waiting worker would only hold memory"
        monkeypatch.setenv(worker.TRAIN_GPUS_ENV, "1")
        warm.prepare()
        assert warm.waiting_pid() is not None
    finally:
        warm.close()


def test_swift_logging_jsonl_becomes_progress_events(tmp_path):
    """ms-swift's logging.jsonl as 4.6 writes it: a line per logged step, the run's summary, then the result."""
    lines = [
        {"loss": 1.12648451, "grad_norm": 0.82964367, "learning_rate": 0.0009986, "token_acc": 0.88928571,
         "epoch": 0.5, "global_step/max_steps": "1/2", "elapsed_time": "27s", "remaining_time": "27s",
         "memory(GiB)": 15.7, "train_speed(s/it)": 26.781132},
        {"loss": 0.75, "grad_norm": 0.7, "learning_rate": 0.0, "token_acc": 0.9, "epoch": 1.0,
         "global_step/max_steps": "2/2", "elapsed_time": "50s", "remaining_time": "0s", "train_speed(s/it)": 25.0},
        {"train_runtime": 50.1, "train_samples_per_second": 0.32, "train_steps_per_second": 0.04, "train_loss": 0.94,
         "epoch": 1.0, "global_step/max_steps": "2/2", "elapsed_time": "50s", "remaining_time": "0s"},
        {"last_model_checkpoint": "/runs/7/train/checkpoint-2", "best_model_checkpoint": None, "best_metric": None,
         "global_step": 2, "log_history": [{"loss": 1.12648451, "step": 1}], "memory": 15.7},
    ]
    path = tmp_path / "logging.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    events = [worker.event_from_log(json.loads(line)) for line in path.read_text().splitlines()]
    assert events == [
        {"event": "progress", "step": 1, "total_steps": 2, "loss": 1.12648451, "eta_s": 26.8},
        {"event": "progress", "step": 2, "total_steps": 2, "loss": 0.75, "eta_s": 0.0},
        None,  # the summary is not a step
        {"event": "done", "adapter": "/runs/7/train/checkpoint-2", "global_step": 2},
    ]


def fake_launcher(monkeypatch, tmp_path, body):
    """Replace ms-swift's launcher by a small script: it gets `sft ARGS` and torchrun's environment,
    and writes ms-swift's logging.jsonl (``log(dict)``) into ``out``, the --output_dir."""
    script = tmp_path / "launcher.py"
    preamble = ("import json, os, sys\nargs = sys.argv[1:]\nout = args[args.index('--output_dir') + 1]\n"
                "def log(line):\n"
                "    with open(os.path.join(out, 'logging.jsonl'), 'a') as f:\n"
                "        f.write(json.dumps(line) + '\\n')\n")
    script.write_text(preamble + textwrap.dedent(body))
    monkeypatch.setattr(train, "_swift_cli", lambda: [sys.executable, str(script)])
    monkeypatch.setenv(worker.TRAIN_GPUS_ENV, "0,1")


def test_training_on_several_gpus_reports_progress_and_returns_the_last_checkpoint(monkeypatch, tmp_path, embedded_model):
    fake_launcher(monkeypatch, tmp_path, """
        print("argv", json.dumps(args), flush=True)
        print("env", *(f"{k}={os.environ.get(k)}" for k in ("NPROC_PER_NODE", "CUDA_VISIBLE_DEVICES", "NCCL_NVLS_ENABLE")))
        for step in (1, 2, 3):
            log({"loss": 2.0 / step, "global_step/max_steps": f"{step}/3", "train_speed(s/it)": 4.0})
        os.makedirs(os.path.join(out, "checkpoint-3"))
        log({"train_runtime": 12.0, "train_loss": 1.2, "global_step/max_steps": "3/3"})
        log({"last_model_checkpoint": os.path.join(out, "checkpoint-3"), "global_step": 3})
    """)
    out = tmp_path / "out"
    out.mkdir()
    (out / "logging.jsonl").write_text('{"last_model_checkpoint": "/an/earlier/try"}\n')  # ms-swift appends
    seen = []
    adapter = train_adapter(embedded_model, tmp_path / "d.jsonl", out, replace(Recipe(), batch_size=8),
                            on_progress=lambda *a: seen.append(a))
    assert adapter == (out / "checkpoint-3").resolve()
    assert seen == [(0, 3, None, None), (1, 3, 2.0, 8.0), (2, 3, 1.0, 4.0), (3, 3, 2.0 / 3, 0.0)]
    log = (out / "worker.log").read_text()
    assert "env NPROC_PER_NODE=2 CUDA_VISIBLE_DEVICES=0,1 NCCL_NVLS_ENABLE=0" in log
    argv = json.loads(log.split("argv ", 1)[1].splitlines()[0])
    assert argv[0] == "sft" and flag(argv, "--per_device_train_batch_size") == "4"
    assert flag(argv, "--dataset") == str((tmp_path / "d.jsonl").resolve())
    assert flag(argv, "--system") == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_cancel_on_several_gpus_kills_every_rank(monkeypatch, tmp_path, embedded_model):
    alive = tmp_path / "rank-alive"  # the rank holds it open for writing while it lives
    os.mkfifo(alive)
    watch = os.open(alive, os.O_RDONLY | os.O_NONBLOCK)
    fake_launcher(monkeypatch, tmp_path, f"""
        import signal, subprocess
        rank = subprocess.Popen([sys.executable, "-c", "import signal; f = open({str(alive)!r}, 'w'); print(1, flush=True); signal.pause()"],
                                stdout=subprocess.PIPE)  # torchrun's worker
        rank.stdout.readline()
        log({{"loss": 2.0, "global_step/max_steps": "1/9", "train_speed(s/it)": 4.0}})
        signal.pause()
    """)
    seen = []
    with pytest.raises(TrainingCancelled):
        train_adapter(embedded_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe(),
                      on_progress=lambda *a: seen.append(a), should_cancel=lambda: len(seen) >= 2)
    readable, _, _ = select.select([watch], [], [], 60)  # the end of file comes when the last writer is gone
    assert readable and os.read(watch, 1) == b"", "the rank outlived the cancel"
    os.close(watch)


def test_a_failed_launch_raises_with_the_log_tail(monkeypatch, tmp_path, embedded_model):
    fake_launcher(monkeypatch, tmp_path, """
        sys.exit("torch.distributed.elastic.multiprocessing.errors.ChildFailedError: rank 1 failed")
    """)
    with pytest.raises(TrainingError, match="ChildFailedError") as info:
        train_adapter(embedded_model, tmp_path / "d.jsonl", tmp_path / "out", Recipe())
    assert "code 1" in str(info.value)


def test_python_m_finetune_train_trains_with_the_recipe_flags(monkeypatch, tmp_path, tiny_model, capsys):
    """`python -m finetune.train --dataset D --out O [--model M] [--device D] [recipe flags]` (its main, on a fake
    trainer): the flags reach the recipe, the device reaches the trainer, progress and the adapter are printed."""
    def body(out, on_progress, **_):
        on_progress(1, 1, 0.5, 0.0)
        return out / "checkpoint-1"

    calls = fake_train_here(monkeypatch, body)
    monkeypatch.delenv(worker.TRAIN_GPUS_ENV, raising=False)
    monkeypatch.delenv(train.TRAIN_DTYPE_ENV, raising=False)
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"messages": []}\n')
    train.main(["--dataset", str(dataset), "--out", str(tmp_path / "out"), "--model", tiny_model.path,
                "--device", "cpu", "--trainer", "in-process", "--learning_rate", "2e-3", "--lora_targets", "q_proj", "v_proj"])
    out = capsys.readouterr().out
    assert "step 1/1  loss 0.5000  eta 0 s" in out and out.strip().endswith(str((tmp_path / "out" / "checkpoint-1").resolve()))
    recipe = calls[0]["recipe"]
    assert recipe.learning_rate == 2e-3 and recipe.lora_targets == ("q_proj", "v_proj")
    assert recipe.epochs == Recipe().epochs, "flags left out keep the device's recipe"
    assert calls[0]["device"] == "cpu" and calls[0]["lent"] is None
    monkeypatch.setattr(train, "gpu_memory_bytes", lambda device: 141 * 2**30)
    train.main(["--dataset", str(dataset), "--out", str(tmp_path / "out-gpu"), "--model", tiny_model.path,
                "--device", "cuda"])
    assert calls[1]["recipe"] == train.GPU and calls[1]["device"] == "cuda", "the GPU recipe trains on the GPU"
    capsys.readouterr()
    with pytest.raises(SystemExit, match="2"):
        train.main(["--dataset", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o2"), "--device", "cpu"])
    assert "error: --dataset" in capsys.readouterr().err.splitlines()[-1] and not (tmp_path / "o2").exists()
