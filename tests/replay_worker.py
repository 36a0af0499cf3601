"""A training worker that replays a recorded ms-swift run instead of training, so the tests of
everything around training (job runner, evaluation, gate, activation, progress on the page and in
Telegram, cancel and crash handling) run on the suite's one real retrain without paying for another.

    python -m tests.replay_worker RECORDED [--hold-at STEP --fifo PATH]                  # the worker
    python -m tests.replay_worker RECORDED [--hold-at STEP --fifo PATH] --selfcog ARGS  # `selfcog ARGS` with it

RECORDED is a real run's training folder (`data/runs/<id>/train`): ms-swift's logging.jsonl and the
adapter it saved (checkpoint-N/). The worker speaks finetune/worker.py's protocol: it waits for the
job path on stdin, writes its output to the job's worker.log, sends the recorded steps, losses and
ETAs as progress events on the events pipe, copies the recorded adapter into the job's output folder
and reports it done. With --hold-at it stops after that step until the test calls Replay.release()
(or kills it: cancel, a crash).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class Replay:
    """How a test puts the replay worker in place of ms-swift's, and lets a held worker go on."""

    recorded: Path
    hold_at: int | None = None  # the step to stop after until release()
    fifo: Path | None = None  # where a held worker waits: Replay.holding() makes it

    @classmethod
    def holding(cls, recorded: Path, step: int, folder: Path) -> "Replay":
        fifo = Path(folder) / "release-replay"
        os.mkfifo(fifo)
        return cls(Path(recorded), step, fifo)

    def worker_command(self) -> list[str]:
        """What finetune.worker._worker_command returns while this replay is in place."""
        held = ["--hold-at", str(self.hold_at), "--fifo", str(self.fifo)] if self.hold_at is not None else []
        return [sys.executable, "-m", "tests.replay_worker", str(self.recorded), *held]

    def install(self, monkeypatch) -> None:
        """For a job runner in this process: its training workers replay from now on."""
        from finetune import worker

        monkeypatch.setattr(worker, "_worker_command", self.worker_command)
        monkeypatch.setenv("SELFCOG_TRAINER", "worker")  # a replay stands in for the worker process

    def selfcog_command(self, *args: str) -> list[str]:
        """`selfcog ARGS` as a subprocess whose training workers replay (run it from the repository root)."""
        return [*self.worker_command(), "--selfcog", *args]

    def release(self) -> None:
        """Let the held worker go on. Fails at once (ENXIO) if no worker is holding."""
        fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"go")
        finally:
            os.close(fd)


def recorded_progress(recorded: Path) -> list[dict]:
    """The progress events of a recorded run, read from ms-swift's logging.jsonl as the multi-GPU launcher reads it."""
    from finetune.worker import event_from_log

    events = [event_from_log(json.loads(line)) for line in (recorded / "logging.jsonl").read_text(encoding="utf-8").splitlines()]
    return [event for event in events if event and event["event"] == "progress"]


def write_recording(folder: Path, losses: list[float], seconds_per_step: float, adapter: Path | None = None) -> Path:
    """A made-up recorded run in ms-swift's format: logging.jsonl with a line per step, the summing-up
    line and the last one naming the checkpoint (the adapter folder, copied as checkpoint-N, if given)."""
    folder.mkdir(parents=True)
    total = len(losses)
    checkpoint = folder / f"checkpoint-{total}"
    lines = [{"loss": loss, "global_step/max_steps": f"{step}/{total}", "train_speed(s/it)": seconds_per_step}
             for step, loss in enumerate(losses, 1)]
    lines.append({"train_loss": sum(losses) / total, "global_step/max_steps": f"{total}/{total}"})
    lines.append({"last_model_checkpoint": str(checkpoint) if adapter else None, "global_step": total})
    (folder / "logging.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    if adapter is not None:
        shutil.copytree(adapter, checkpoint)
    return folder


def replay(recorded: Path, hold_at: int | None, fifo: Path | None) -> None:
    """The worker's main: wait for a job, replay the recorded run as its progress, hand back the adapter."""
    from finetune.worker import EVENTS_FD_ENV, receive_job

    job = receive_job()
    if job is None:
        return  # stood down before a job came
    print(f"replaying the run recorded in {recorded}", flush=True)
    progress = recorded_progress(recorded)
    total = progress[-1]["total_steps"]
    with os.fdopen(int(os.environ[EVENTS_FD_ENV]), "w", buffering=1, encoding="utf-8") as events:
        events.write(json.dumps({"event": "progress", "step": 0, "total_steps": total}) + "\n")
        for event in progress:
            # Opened before the step is reported, read-write so opening never blocks: a release
            # written any time after the test saw the step waits in the pipe for the read below.
            held = os.open(fifo, os.O_RDWR) if event["step"] == hold_at else None
            events.write(json.dumps(event) + "\n")
            if held is not None:
                print(f"holding at step {hold_at} until the test releases it", flush=True)
                os.read(held, 2)
                os.close(held)
        [checkpoint] = recorded.glob("checkpoint-*")
        adapter = shutil.copytree(checkpoint, Path(job["output_dir"]) / checkpoint.name)
        events.write(json.dumps({"event": "done", "adapter": str(adapter), "global_step": total}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Replay a recorded ms-swift run as selfcog's training worker.")
    parser.add_argument("recorded", type=Path)
    parser.add_argument("--hold-at", type=int)
    parser.add_argument("--fifo", type=Path)
    parser.add_argument("--selfcog", nargs=argparse.REMAINDER, help="run selfcog with these arguments, with this worker")
    args = parser.parse_args()
    if args.selfcog is None:
        replay(args.recorded, args.hold_at, args.fifo)
        return
    from finetune import worker
    from selfcog.cli import main as selfcog

    worker._worker_command = Replay(args.recorded, args.hold_at, args.fifo).worker_command
    os.environ["SELFCOG_TRAINER"] = "worker"  # a replay stands in for the worker process
    sys.argv = ["selfcog", *args.selfcog]
    selfcog()


if __name__ == "__main__":
    main()
