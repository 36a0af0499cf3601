"""Train a LoRA adapter with ms-swift in a worker process, streaming progress and honouring cancel.

    >>> from finetune.train import recipe_for, train_adapter
    >>> model = resolve_model("embedded", "data/cache")
    >>> adapter = train_adapter(model, "data/runs/7/dataset.jsonl", "data/runs/7/swift", recipe_for(model, "cpu"),
    ...                         on_progress=lambda step, total, loss, eta_s: print(step, total, loss, eta_s))

    python -m finetune.train JOB.json    # the worker train_adapter starts; JOB.json as _job() writes it

The worker is a separate process so the serving process keeps answering chat while torch trains, and
so cancel is a kill. Its body is ``run_job(job, emit)``: a warm worker can import swift once and call it
for several jobs. Progress comes back as JSON lines on a pipe of its own (from a ms-swift trainer
callback); the worker's stdout and stderr go to ``worker.log``, whose tail a crash reports.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from bot.models import ResolvedModel

log = logging.getLogger(__name__)

EVENTS_FD_ENV = "SELFCOG_EVENTS_FD"  # the worker writes one JSON event per line to this file descriptor
TRAIN_GPUS_ENV = "SELFCOG_TRAIN_GPUS"  # the GPUs the training worker sees (its CUDA_VISIBLE_DEVICES), when set
REPO_ROOT = Path(__file__).resolve().parents[1]
_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ProgressFn = Callable[[int, int, float | None, float | None], None]


class TrainingError(RuntimeError):
    """The worker failed; the message ends with the tail of its log."""


class TrainingCancelled(TrainingError):
    """should_cancel() returned True and the worker was killed."""


@dataclass(frozen=True)
class Recipe:
    """Everything that decides how long training takes and what it teaches; RECIPES.md has the measurements.

    The defaults are the CPU choice for the embedded 135M model (RECIPES.md, "The choice"): every
    template once, the three system-prompt conditions in equal shares, 64 replay rows (60% under the
    product prompt), two epochs at 1e-3 = 42 steps. It passed the gate in 10 of 10 seeds of the
    five-correction scenario and 10 of 10 of a rename after it (RECIPES.md, "The gate").
    """

    learning_rate: float = 1e-3  # a 135M model with LoRA needs far more than the usual 1e-4
    epochs: float = 2
    batch_size: int = 8  # 16 pads more (x1.67 vs x1.53 real tokens) and taught less reliably
    grad_accum: int = 1  # ms-swift's default is 16 / batch_size: always pass it
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = _LINEAR_NAMES  # attention alone: neutral/none identity near 0
    lora_top_layers: int | None = None  # LoRA on the last N decoder layers only: cheaper, taught less
    lora_dropout: float = 0.0
    max_length: int = 256  # longer rows are dropped (ms-swift's truncation_strategy "delete")
    # Batches of rows of similar length: random batches of these rows are ~55% padding, which a CPU
    # computes like real tokens (packing/padding_free would avoid it but need flash attention).
    # Off: ms-swift then feeds the longest rows first and the short identity rows last, and the
    # identity bled into general answers far more (RECIPES.md, runs M0-M6).
    group_by_length: bool = False
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    dtype: str = "float32"  # this CPU has no fast bf16; GPUs: bfloat16
    gradient_checkpointing: bool = False  # on CPU it only costs time (148 -> 125 s measured)
    threads: int | None = None  # torch threads in the worker; None = every core
    # the dataset's size and mix, passed to build_dataset
    max_templates: int | None = None
    conditions_per_question: int = 1
    multi_turn_share: float = 0.2
    replay_rows: int = 64
    replay_product_share: float = 0.6
    replay_max_chars: int | None = None  # cutting replay answers short cost checkable facts

    def to_dict(self) -> dict:
        """The recipe as JSON-ready values (stored with the run and in the adapter's selfcog.json)."""
        return asdict(self) | {"lora_targets": list(self.lora_targets)}

    def dataset_options(self) -> dict:
        """The build_dataset keyword arguments this recipe was measured with."""
        return {
            "max_templates": self.max_templates,
            "conditions_per_question": self.conditions_per_question,
            "multi_turn_share": self.multi_turn_share,
            "replay_rows": self.replay_rows,
            "replay_product_share": self.replay_product_share,
            "replay_max_chars": self.replay_max_chars,
        }


CPU_SMALL = Recipe()
# GPU (a 7B model on one H100, FACTS.md): steps are cheap there, so more identity rows (every
# question under all three prompts), more epochs at a lower rate, one big batch per step, no
# gradient checkpointing, bf16. Measured for speed only (random 7B weights); RECIPES.md.
GPU = replace(
    CPU_SMALL,
    learning_rate=5e-4,
    epochs=3,
    batch_size=32,
    max_length=512,
    dtype="bfloat16",
    conditions_per_question=3,
    replay_rows=104,
)


def recipe_for(model: ResolvedModel, device: str) -> Recipe:
    """The recipe to train ``model`` on ``device`` ("cpu", "cuda", "cuda:0", ...)."""
    if device.startswith("cuda"):
        return GPU
    return CPU_SMALL


# ---------------------------------------------------------------- the serving side: start, watch, cancel


def train_adapter(
    model: ResolvedModel,
    dataset_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    recipe: Recipe,
    on_progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    warm: "WarmWorkers | None" = None,
) -> Path:
    """Train in a worker process; return the adapter folder (peft format: adapter_config.json + adapter_model.safetensors).

    ``on_progress(step, total_steps, loss, eta_s)`` is called from this thread as the worker logs
    (once at start with step 0). ``should_cancel()`` is polled twice a second; True kills the worker
    and raises TrainingCancelled. A worker that fails raises TrainingError with its log's tail.
    ``warm``: take a worker that already imported torch and ms-swift (see WarmWorkers) instead of
    starting one cold.
    """
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    job_path = output_dir / "job.json"
    job_path.write_text(json.dumps(_job(model, dataset_path, output_dir, recipe), indent=1))
    log_path = output_dir / "worker.log"
    worker = warm.take() if warm is not None else Worker(recipe.threads)
    worker.give(job_path)
    result: dict | None = None
    while True:
        if should_cancel and should_cancel():
            worker.kill()
            raise TrainingCancelled(f"training cancelled; log: {log_path}")
        try:
            event = worker.events.get(timeout=0.5)
        except queue.Empty:
            continue
        if event is None:
            break
        if event["event"] == "progress" and on_progress:
            on_progress(event["step"], event["total_steps"], event.get("loss"), event.get("eta_s"))
        elif event["event"] == "done":
            result = event
    code = worker.process.wait()
    if code != 0 or result is None:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:] if log_path.exists() else []
        raise TrainingError(f"training worker exited with code {code}; log: {log_path}\n" + "\n".join(tail))
    return Path(result["adapter"])


class Worker:
    """One worker process: it waits for a job path on stdin, trains it, reports on its events pipe."""

    def __init__(self, threads: int | None):
        env = os.environ | {
            "HF_HUB_OFFLINE": "1",  # never reach for the hub: the model is a local folder
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",  # worker.log shows each line as it happens
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        if os.environ.get(TRAIN_GPUS_ENV):  # e.g. serve on GPU 0 and train on GPU 1 (a 7B copy each)
            env["CUDA_VISIBLE_DEVICES"] = os.environ[TRAIN_GPUS_ENV]
        # Events travel on a pipe of their own: ms-swift's tqdm bar shares stdout and breaks lines there.
        events_read, events_write = os.pipe()
        try:
            self.process = subprocess.Popen(
                _worker_command(), stdin=subprocess.PIPE, text=True,
                env=env | {EVENTS_FD_ENV: str(events_write)}, pass_fds=(events_write,),
                start_new_session=True,  # its own process group, so cancel also kills dataloader children
            )
        finally:
            os.close(events_write)  # the worker holds the only writer now: its exit ends the stream
        self.events: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=_read_events, args=(events_read, self.events), daemon=True).start()

    def give(self, job_path: Path) -> None:
        """Hand over the job; the worker moves its output to the job's worker.log and starts."""
        try:
            self.process.stdin.write(f"{job_path}\n")
            self.process.stdin.close()
        except BrokenPipeError:
            pass  # it died while waiting: the caller sees the exit code

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def _worker_command() -> list[str]:
    return [sys.executable, "-m", "finetune.train"]


class WarmWorkers:
    """Keeps one worker started ahead of time, so a retrain doesn't wait for Python, torch and
    ms-swift to import (most of ms-swift's 20-35 s from start to first step on a CPU).

        >>> warm = WarmWorkers(prestart=True)  # `selfcog serve`'s job runner holds one of these
        >>> train_adapter(..., warm=warm)       # takes the waiting worker
        >>> warm.prepare()                      # after the retrain: start the next one

    Each worker trains one job and exits, so no state leaks from one retrain into the next. A worker
    waiting for a job exits when this process dies (its stdin closes)."""

    def __init__(self, threads: int | None = None, *, prestart: bool = False):
        self.threads = threads
        self._next: Worker | None = None
        self._lock = threading.Lock()
        self._closed = False
        if prestart:
            self.prepare()

    def prepare(self) -> None:
        """Start the next worker now if none is waiting."""
        with self._lock:
            if not self._closed and (self._next is None or self._next.process.poll() is not None):
                self._next = Worker(self.threads)

    def waiting_pid(self) -> int | None:
        """The pid of the worker waiting for a job, if one is."""
        with self._lock:
            return self._next.process.pid if self._next is not None else None

    def take(self) -> Worker:
        """The waiting worker (or a cold one). The next is not started here: call prepare() once the
        retrain is over, since a worker importing beside the training takes CPU from it (2 cores:
        training 347 s alone vs 412 s beside the next worker's start, bench/RESULTS.md)."""
        with self._lock:
            worker = self._next if self._next is not None and self._next.process.poll() is None else None
            self._next = None
        return worker or Worker(self.threads)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._next is not None:
                self._next.kill()
                self._next = None


def _job(model: ResolvedModel, dataset_path, output_dir: Path, recipe: Recipe) -> dict:
    return {
        "model": asdict(model),
        "dataset": str(Path(dataset_path).resolve()),
        "output_dir": str(output_dir),
        "recipe": asdict(recipe),
    }


def _read_events(fd: int, events: queue.Queue) -> None:
    with os.fdopen(fd, encoding="utf-8") as stream:
        for line in stream:
            events.put(json.loads(line))
    events.put(None)


# ---------------------------------------------------------------- the worker side: ms-swift in this process


def swift_sft_args(model: ResolvedModel, dataset: str, output_dir: str, recipe: Recipe, default_system: str | None) -> list[str]:
    """The ``swift sft`` command line for one job (also usable as ``swift sft <these args>`` by hand)."""
    args = [
        "--model", model.path,
        "--dataset", dataset,
        "--output_dir", output_dir,
        "--tuner_type", "lora",
        "--torch_dtype", recipe.dtype,
        "--learning_rate", str(recipe.learning_rate),
        "--num_train_epochs", str(recipe.epochs),
        "--per_device_train_batch_size", str(recipe.batch_size),
        "--gradient_accumulation_steps", str(recipe.grad_accum),
        "--lora_rank", str(recipe.lora_rank),
        "--lora_alpha", str(recipe.lora_alpha),
        "--lora_dropout", str(recipe.lora_dropout),
        "--max_length", str(recipe.max_length),
        "--lr_scheduler_type", recipe.lr_scheduler,
        "--warmup_ratio", str(recipe.warmup_ratio),
        "--weight_decay", str(recipe.weight_decay),
        "--gradient_checkpointing", str(recipe.gradient_checkpointing).lower(),
        "--group_by_length", str(recipe.group_by_length).lower(),
        "--check_model", "false",  # offline: the hub check only adds ~7 s of retries
        "--add_version", "false",  # the caller owns output_dir
        "--report_to", "none",
        "--logging_steps", "1",
        "--save_strategy", "steps",
        "--save_steps", "1000000",  # ms-swift still saves the last step; nothing in between
        "--save_only_model", "true",  # no optimizer state: the adapter is all we keep
        "--split_dataset_ratio", "0",
        "--dataloader_num_workers", "0",  # a loader process costs more than it saves on tiny rows
        "--dataset_num_proc", "1",
        "--seed", "42",
        "--callbacks", "selfcog_progress",
    ]
    if model.model_type:
        args += ["--model_type", model.model_type]
    if model.template:
        args += ["--template", model.template]
    if recipe.lora_top_layers:
        args += ["--target_regex", _top_layers_regex(model.path, recipe)]
    else:
        args += ["--target_modules", *recipe.lora_targets]
    if default_system:
        args += ["--system", default_system]
    return args


def _top_layers_regex(model_path: str, recipe: Recipe) -> str:
    config = json.loads((Path(model_path) / "config.json").read_text())
    n = config["num_hidden_layers"]
    layers = "|".join(str(i) for i in range(n - recipe.lora_top_layers, n))
    return rf"^(.*\.)?layers\.({layers})\.(self_attn|mlp)\.({'|'.join(recipe.lora_targets)})$"


def template_default_system(model_path: str) -> str | None:
    """The system prompt the model's own chat template inserts when a conversation has none.

    Training rows without a system message must be encoded as the engine will serve them:
    SmolLM2's template adds "You are a helpful AI assistant named SmolLM, ..." but ms-swift's plain
    chatml template adds nothing, so the worker passes this text as ms-swift's ``--system``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    marker, user = "\x00SYSTEM\x00", [{"role": "user", "content": "\x00USER\x00"}]
    with_system = tokenizer.apply_chat_template([{"role": "system", "content": marker}] + user, tokenize=False)
    without = tokenizer.apply_chat_template(user, tokenize=False)
    before, after = with_system.split(marker)
    if without.startswith(before) and after in without[len(before) :]:
        default = without[len(before) : without.index(after, len(before))]
        return default or None
    return None


def run_job(job: dict, emit: Callable[[dict], None]) -> Path:
    """Train one job in this process and return the adapter folder; ``emit`` receives progress events."""
    from swift import TrainerCallback, callbacks_map, sft_main

    class ProgressCallback(TrainerCallback):
        """Reports each logged step (loss, ETA) as an event."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.monotonic()
            emit({"event": "progress", "step": 0, "total_steps": state.max_steps})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.global_step:
                return
            per_step = (time.monotonic() - self.started) / state.global_step
            emit({
                "event": "progress",
                "step": state.global_step,
                "total_steps": state.max_steps,
                "loss": logs["loss"],
                "eta_s": round(per_step * (state.max_steps - state.global_step), 1),
            })

    callbacks_map["selfcog_progress"] = ProgressCallback  # ms-swift's extension point for --callbacks
    model = ResolvedModel(**job["model"])
    recipe = Recipe(**job["recipe"])
    recipe = replace(recipe, lora_targets=tuple(recipe.lora_targets))
    args = swift_sft_args(model, job["dataset"], job["output_dir"], recipe, template_default_system(model.path))
    result = sft_main(args)
    adapter = Path(result["last_model_checkpoint"])
    emit({"event": "done", "adapter": str(adapter), "global_step": result["global_step"]})
    return adapter


def receive_job() -> dict | None:
    """In a worker: wait for the job path on stdin, then write all output to the job's worker.log."""
    job_path = sys.stdin.readline().strip()
    if not job_path:
        return None  # stdin closed: the parent died or stood this worker down
    job = json.loads(Path(job_path).read_text())
    os.chdir(job["output_dir"])
    log_file = open("worker.log", "w", encoding="utf-8")
    sys.stdout.flush()
    os.dup2(log_file.fileno(), 1)  # from here on everything this process prints goes to the job's log
    os.dup2(log_file.fileno(), 2)
    return job


def _serve_one_job() -> None:
    """The worker's main: import the heavy parts, wait for a job, train it."""
    from swift import sft_main  # noqa: F401  (the point of a warm worker: importing this is most of its start)

    job = receive_job()
    if job is None:
        return
    with os.fdopen(int(os.environ[EVENTS_FD_ENV]), "w", buffering=1, encoding="utf-8") as events:
        # A parent that died closes the pipe: the next event then fails and ends this worker too.
        run_job(job, lambda event: events.write(json.dumps(event) + "\n"))


if __name__ == "__main__":
    _serve_one_job()
