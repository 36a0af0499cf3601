"""A vLLM server this process starts and looks after (``SELFCOG_ENGINE=vllm``).

    >>> server = VLLMServer(model.path, log_path="data/logs/vllm.log")
    >>> server.start()                 # ready once /health answers (~50 s on a 2-core CPU)
    >>> server.base_url
    'http://127.0.0.1:41789/v1'
    >>> server.stop()

- It runs ``python -m vllm.entrypoints.openai.api_server`` from vLLM's own virtualenv (``make vllm``
  makes .venv-vllm; SELFCOG_VLLM_PYTHON names another python), on 127.0.0.1 only: the server has no
  authentication, and adapters are loaded into it by file path.
- The model is served as ``base``; LoRA adapters are loaded at runtime by name (bot/engines/openai.py).
- A supervisor thread restarts it when it dies, on the same port, and then calls ``on_restart`` (the
  engine loads the live adapter again: a new server has none). If a restart does not come up healthy,
  it gives up and ``error`` says why; the log file says more.
- On a GPU it starts with sleep mode: ``sleep()`` frees the GPU's memory for a retrain on the same card,
  ``wake_up()`` takes it back (the engine's ``pause_for_training()`` does both).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import httpx

from bot.engines import EngineError

log = logging.getLogger(__name__)

SERVED_NAME = "base"  # what requests for the bare base model ask for
DEFAULT_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm"


def default_python() -> str:
    """vLLM's python: SELFCOG_VLLM_PYTHON, else .venv-vllm next to this checkout (``make vllm``)."""
    return os.environ.get("SELFCOG_VLLM_PYTHON") or str(DEFAULT_VENV / "bin" / "python")


class VLLMServer:
    """One vLLM OpenAI-compatible server process on loopback, restarted when it dies. See the module docstring."""

    def __init__(self, model_path: str, *, log_path: str | Path, python: str | None = None, max_lora_rank: int = 8,
                 max_loras: int = 2, max_model_len: int = 2048, max_num_seqs: int = 64, dtype: str = "bfloat16",
                 sleep_mode: bool = False, extra_args: str = "", start_timeout_s: float = 600.0,
                 on_restart: Callable[[], None] = lambda: None):
        """extra_args: more vLLM flags, as one string (SELFCOG_VLLM_ARGS, e.g. "--tensor-parallel-size 2").
        sleep_mode: allow sleep()/wake_up() (vLLM supports it on GPUs only)."""
        self.python = python or default_python()
        self.model_path = model_path
        self.log_path = Path(log_path)
        self.sleep_mode = sleep_mode
        self.start_timeout_s = start_timeout_s
        self.on_restart = on_restart
        self.port = _free_port()
        self.root_url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.root_url}/v1"
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), "--model", model_path,
                     "--served-model-name", SERVED_NAME, "--dtype", dtype, "--max-model-len", str(max_model_len),
                     "--max-num-seqs", str(max_num_seqs), "--enable-lora", "--max-lora-rank", str(max_lora_rank),
                     "--max-loras", str(max_loras), "--disable-uvicorn-access-log",  # no line per /health
                     *(["--enable-sleep-mode"] if sleep_mode else []),
                     *shlex.split(extra_args)]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                    # /sleep and /wake_up exist only in dev mode; it adds no way in, the server is on loopback
                    **({"VLLM_SERVER_DEV_MODE": "1"} if sleep_mode else {})}
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache when it runs on the CPU
        self.restarts = 0
        self.error: str | None = None  # why it is down for good (a restart failed), else None
        self._process: subprocess.Popen | None = None
        self._ready = threading.Event()  # set while serving, or once it gave up (then error is set)
        self._stopping = False
        self._lock = threading.Lock()  # guards _stopping against a (re)start under way
        self._supervisor: threading.Thread | None = None

    def start(self) -> None:
        """Start the server and wait until it answers; EngineError (naming the log file) if it doesn't."""
        if not Path(self.python).exists():
            raise EngineError(f"vLLM is not installed: {self.python} does not exist (run `make vllm`, "
                              f"or point SELFCOG_VLLM_PYTHON at a python that has vllm)")
        self._launch()
        self._ready.set()
        self._supervisor = threading.Thread(target=self._supervise, name="vllm-supervisor", daemon=True)
        self._supervisor.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until the server answers /health (a restart may be under way); EngineError if it is down for good."""
        deadline = time.monotonic() + timeout_s
        while not self.error:
            # /health, not just the flag: the supervisor may not have seen a death of a moment ago yet
            if self._ready.is_set() and self._healthy():
                return
            if time.monotonic() > deadline:
                raise EngineError(f"the vLLM server did not come back within {timeout_s:.0f} s (log: {self.log_path})")
            time.sleep(0.5)
        raise EngineError(self.error)

    def down_reason(self) -> str | None:
        """Why requests cannot reach it now (for the engine's error message), or None when it should answer."""
        if self.error:
            return self.error
        if not self._ready.is_set():
            return f"the vLLM server is restarting after a crash, try again in a minute (log: {self.log_path})"
        return None

    def sleep(self, level: int = 1) -> None:
        """Free the GPU (level 1: weights to CPU memory, KV cache dropped) for a retrain on the same card."""
        self._post(f"/sleep?level={level}")

    def wake_up(self) -> None:
        self._post("/wake_up")

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            process = self._process
        if process is not None:
            _end_group(process)
        if self._supervisor is not None:
            self._supervisor.join(timeout=30)

    # --- process handling -----------------------------------------------------------------------
    def _launch(self) -> None:
        """Start the process and wait for /health; on failure nothing of it is left running."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [self.python, "-m", "vllm.entrypoints.openai.api_server", *self.args]
        with open(self.log_path, "a", encoding="utf-8") as out:
            out.write(f"\n--- selfcog {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n")
            out.flush()
            with self._lock:  # stop() ends what was started before it, and nothing starts after it
                if self._stopping:
                    raise EngineError("the vLLM server is being stopped")
                # its own process group: vLLM starts an engine-core process, which must go down with it
                self._process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        log.info("starting vLLM on %s (pid %s, log %s)", self.base_url, self._process.pid, self.log_path)
        started = time.monotonic()
        try:
            self._wait_healthy(started)
        except BaseException:
            _end_group(self._process)
            raise
        log.info("vLLM is ready on %s after %.0f s", self.base_url, time.monotonic() - started)

    def _wait_healthy(self, started: float) -> None:
        while True:
            code = self._process.poll()
            if code is not None:
                raise EngineError(f"the vLLM server exited with code {code} while starting: "
                                  f"{_last_line(self.log_path)} (log: {self.log_path})")
            if self._healthy():
                return
            if self._stopping:
                raise EngineError("the vLLM server was stopped while starting")
            if time.monotonic() - started > self.start_timeout_s:
                raise EngineError(f"the vLLM server did not answer within {self.start_timeout_s:.0f} s "
                                  f"(log: {self.log_path})")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.root_url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False  # not listening (yet, or any more)

    def _supervise(self) -> None:
        """Restart the server whenever it dies (unless stopping); give up if a restart does not come up."""
        while True:
            code = self._process.wait()
            if self._stopping:
                return
            self._ready.clear()
            log.warning("the vLLM server died (exit code %s); restarting it (log: %s)", code, self.log_path)
            _end_group(self._process)  # its engine-core process, if it outlived it
            try:
                self._launch()
            except Exception as e:
                if self._stopping:
                    return
                self.error = f"the vLLM server died and could not be restarted: {e}"
                log.error("%s", self.error)
                self._ready.set()
                return
            self.restarts += 1
            try:
                self.on_restart()
            except Exception as e:  # e.g. the live adapter refused: the engine keeps its own error for that
                log.warning("after restarting vLLM: %s", e)
            self._ready.set()

    def _post(self, path: str) -> None:
        try:
            httpx.post(f"{self.root_url}{path}", timeout=120).raise_for_status()
        except httpx.HTTPError as e:
            raise EngineError(f"the vLLM server refused {path}: {e} (log: {self.log_path})") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end_group(process: subprocess.Popen) -> None:
    """Stop the process and everything it started: SIGTERM, then SIGKILL after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return  # the whole group is gone
        try:
            process.wait(wait_s)
            if sig == signal.SIGKILL or _group_empty(process.pid):
                return
        except subprocess.TimeoutExpired:
            pass


def _group_empty(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return False
    except ProcessLookupError:
        return True


def _last_line(path: Path) -> str:
    """The log's last line that says something (the reason vLLM gave up, usually)."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "no log"
    return next((line for line in reversed(lines) if line and not line.startswith("---")), "no output")[-300:]

