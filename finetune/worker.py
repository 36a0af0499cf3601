"""The processes that train: a worker running ``finetune.train.run_job``, or ms-swift's own launcher.

    python -m finetune.worker    # what train_adapter starts: waits for a job path on stdin, then trains it

Training runs outside the serving process so chat keeps answering while torch trains, and so
cancel is a kill of the process group. Either kind of process hands the caller the same stream of
events on ``.events`` (a queue of dicts, then None when the process is gone):

    {"event": "progress", "step": 3, "total_steps": 42, "loss": 1.7, "eta_s": 80.0}
    {"event": "done", "adapter": ".../checkpoint-42", "global_step": 42}

``Worker`` (one GPU or the CPU): it imports torch and ms-swift, waits for a job, trains it with
``run_job`` and sends events on a pipe of its own (ms-swift's tqdm bar shares stdout and breaks
lines there). ``WarmWorkers`` starts one ahead of time. ``SwiftLaunch`` (several GPUs): ms-swift's
torchrun launcher, whose progress is read from the logging.jsonl ms-swift writes beside its
checkpoints. Either way stdout and stderr go to the job's ``worker.log``, whose tail a crash reports.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

EVENTS_FD_ENV = "SELFCOG_EVENTS_FD"  # the worker writes one JSON event per line to this file descriptor
TRAIN_GPUS_ENV = "SELFCOG_TRAIN_GPUS"  # the GPUs training uses (CUDA_VISIBLE_DEVICES of its processes), when set
REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_POLL_S = 0.5  # how often SwiftLaunch reads ms-swift's logging.jsonl


def training_gpus() -> list[str]:
    """The GPUs SELFCOG_TRAIN_GPUS lists ("0,1" -> ["0", "1"]); [] when unset."""
    return [gpu.strip() for gpu in os.environ.get(TRAIN_GPUS_ENV, "").split(",") if gpu.strip()]


def training_env() -> dict[str, str]:
    """The environment of every training process: offline, unbuffered, this repository importable."""
    return os.environ | {
        "HF_HUB_OFFLINE": "1",  # never reach for the hub: the model is a local folder
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",  # worker.log shows each line as it happens
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the process and everything it started (dataloaders, torchrun's ranks), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


# ---------------------------------------------------------------- one process that runs run_job


def _worker_command() -> list[str]:
    """How a worker starts (tests put a replaying worker here)."""
    return [sys.executable, "-m", "finetune.worker"]


class Worker:
    """One worker process: it waits for a job path on stdin, trains it, reports on its events pipe."""

    def __init__(self, threads: int | None):
        env = training_env()
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        if os.environ.get(TRAIN_GPUS_ENV):  # e.g. serve on GPU 0 and train on GPU 1 (a 7B copy each)
            env["CUDA_VISIBLE_DEVICES"] = os.environ[TRAIN_GPUS_ENV]
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
        _kill_group(self.process)


def _read_events(fd: int, events: queue.Queue) -> None:
    with os.fdopen(fd, encoding="utf-8") as stream:
        for line in stream:
            events.put(json.loads(line))
    events.put(None)


class WarmWorkers:
    """Keeps one worker started ahead of time, so a retrain doesn't wait for Python, torch and
    ms-swift to import (most of ms-swift's 20-35 s from start to first step on a CPU).

        >>> warm = WarmWorkers(prestart=True)  # `selfcog serve`'s job runner holds one of these
        >>> train_adapter(..., warm=warm)       # takes the waiting worker
        >>> warm.prepare()                      # after the retrain: start the next one

    Each worker trains one job and exits, so no state leaks from one retrain into the next. A worker
    waiting for a job exits when this process dies (its stdin closes). Training on several GPUs
    (SELFCOG_TRAIN_GPUS=0,1) goes through ms-swift's launcher, so no worker waits then."""

    def __init__(self, threads: int | None = None, *, prestart: bool = False):
        self.threads = threads
        self._next: Worker | None = None
        self._lock = threading.Lock()
        self._closed = False
        if prestart:
            self.prepare()

    def prepare(self) -> None:
        """Start the next worker now if none is waiting (and none when training goes through ms-swift's launcher)."""
        if len(training_gpus()) > 1:
            return
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


def serve_one_job() -> None:
    """The worker's main: import the heavy parts, wait for a job, train it."""
    from swift import sft_main  # noqa: F401  (the point of a warm worker: importing this is most of its start)

    from finetune.train import run_job

    job = receive_job()
    if job is None:
        return
    with os.fdopen(int(os.environ[EVENTS_FD_ENV]), "w", buffering=1, encoding="utf-8") as events:
        # A parent that died closes the pipe: the next event then fails and ends this worker too.
        run_job(job, lambda event: events.write(json.dumps(event) + "\n"))


# ---------------------------------------------------------------- ms-swift's launcher (several GPUs)


class SwiftLaunch:
    """ms-swift's own command (``swift sft`` under torchrun), followed through its logging.jsonl.

    ``argv`` and ``env`` come from ``finetune.train.multi_gpu_command``; ``env`` is added to
    ``training_env()``. The output goes to ``output_dir/worker.log``; ms-swift appends a line per
    logged step to ``output_dir/logging.jsonl`` and, at the end, one with ``last_model_checkpoint``."""

    def __init__(self, argv: list[str], env: dict[str, str], output_dir: Path):
        self.log_path = Path(output_dir) / "logging.jsonl"
        self.log_path.unlink(missing_ok=True)  # ms-swift appends: a retried job must not read the last try
        with open(Path(output_dir) / "worker.log", "w", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                argv, cwd=output_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=training_env() | env,
                start_new_session=True,  # cancel kills torchrun and every rank with one killpg
            )
        self.events: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._follow_log, daemon=True).start()

    def kill(self) -> None:
        _kill_group(self.process)

    def _follow_log(self) -> None:
        """Turn each new complete line of logging.jsonl into an event until the process is gone."""
        offset, started = 0, False
        try:
            while True:
                exited = self.process.poll() is not None  # read once more after the exit: the last lines
                text = self.log_path.read_text(encoding="utf-8") if self.log_path.exists() else ""
                end = text.rfind("\n") + 1  # a line still being written waits for the next read
                for line in text[offset:end].splitlines():
                    event = event_from_log(json.loads(line))
                    if event and event["event"] == "progress" and not started:
                        started = True  # step 0 first, as the worker sends it: training has begun
                        self.events.put({"event": "progress", "step": 0, "total_steps": event["total_steps"]})
                    if event:
                        self.events.put(event)
                offset = end
                if exited:
                    return
                try:
                    self.process.wait(timeout=LOG_POLL_S)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self.events.put(None)  # even if a line could not be read: the caller then waits for the exit


def free_port() -> int:
    """A TCP port nobody listens on now, for torchrun's rendezvous (MASTER_PORT)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def event_from_log(logs: dict) -> dict | None:
    """One line of ms-swift's logging.jsonl as a worker event, or None for a line that is neither.

    A step: ``{"loss": 1.7, "global_step/max_steps": "3/42", "train_speed(s/it)": 2.1, ...}``;
    the end: ``{"last_model_checkpoint": ".../checkpoint-42", "global_step": 42, ...}``."""
    if logs.get("last_model_checkpoint"):
        return {"event": "done", "adapter": logs["last_model_checkpoint"], "global_step": logs.get("global_step")}
    if "loss" in logs and "global_step/max_steps" in logs:
        step, total = (int(n) for n in logs["global_step/max_steps"].split("/"))
        speed = logs.get("train_speed(s/it)")
        eta = round(speed * (total - step), 1) if speed is not None else None
        return {"event": "progress", "step": step, "total_steps": total, "loss": logs["loss"], "eta_s": eta}
    return None


if __name__ == "__main__":
    serve_one_job()
