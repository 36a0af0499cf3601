"""The engine over an OpenAI-compatible server: vLLM that selfcog runs itself, or one someone else runs.

    SELFCOG_ENGINE=vllm selfcog serve          # selfcog starts vLLM on loopback (bot/engines/vllm_server.py)
    SELFCOG_ENGINE=openai SELFCOG_OPENAI_BASE_URL=http://gpu-box:8000/v1 selfcog serve   # attach to one

The server does the batching; this module only speaks HTTP (streamed chat completions, server-sent events).

Adapters are vLLM runtime LoRAs, picked per request by the ``model`` field:

- The live adapter (the store's active row, read every ``poll_s`` seconds, before a request when
  that is due, and at once on ``refresh_adapter()``) is loaded as ``selfcog-v<version>``, from its folder, with
  ``POST /v1/load_lora_adapter``; the previous live name is unloaded. Every selfcog process sharing
  the server does the same, so whichever sees an activation first loads it (the others load it in place).
- A candidate folder (a retrain's evaluation) is loaded under a name of its own, answered, and unloaded.
- The bare base is ``base`` on a managed server; an attached server's base model is
  SELFCOG_OPENAI_MODEL, or the only base model it lists.
- A server that forgot the live adapter (it restarted) answers 404 for its name: the adapter is loaded
  again and the request sent once more.
- An adapter the server refuses (rank above ``--max-lora-rank``, another base) is not retried until the
  store names another; ``adapter_error`` says why and what serves instead, as with the local engine.

Adapter folders are loaded by path *on the server's machine*: an attached server must see the same
paths (shared storage, or the same box).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import httpx

from bot.engines import (AdapterFolderError, AdapterRef, EngineError, Messages, Reply, Sampling, TrainingPause,
                         check_adapter_folder, store_live_adapter)
from bot.engines.local import LocalEngine
from bot.engines.vllm_server import SERVED_NAME, VLLMServer
from bot.models import ResolvedModel

log = logging.getLogger(__name__)
IN_FLIGHT = 64  # requests an evaluation keeps in flight at once (httpx pools 100 connections)


class OpenAIEngine:
    """The Engine protocol over an OpenAI-compatible HTTP API. See the module docstring."""

    def __init__(self, model: ResolvedModel, base_url: str, *, api_key: str | None = None,
                 served_model: str | None = None, active_adapter: Callable[[], dict | None] | None = None,
                 server: VLLMServer | None = None, device: str = "cpu", max_new_tokens: int = 256,
                 max_context_tokens: int = 2048, capacity: int = 64, poll_s: float = 1.0, timeout_s: float = 300.0):
        """base_url: ends in /v1. server: the managed vLLM behind base_url (None: someone else's server).
        served_model: the base model's name on the server (None: the only one it lists).
        device: where a retrain runs (engine.device is what the job runner trains on)."""
        from transformers import AutoTokenizer

        self.name = model.name
        self.device = device
        self.trains_on_serving_weights = False  # the weights are in the server: a retrain loads its own copy
        self.capacity = capacity
        self.max_new_tokens = max_new_tokens
        self.poll_s = poll_s
        self.base_url = base_url.rstrip("/")
        self._model = model
        self.server = server
        self._active_adapter = active_adapter
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client_options = dict(base_url=self.base_url, headers=headers,
                                    timeout=httpx.Timeout(timeout_s, connect=10))
        self._http = httpx.Client(**self._client_options)
        # Prompts are fitted to the context here, as the local engine does (oldest turns go first).
        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.base_name, served_len = self._find_base_model(served_model)
        self.max_context_tokens = min(max_context_tokens, served_len or max_context_tokens)

        self._lock = threading.RLock()  # the adapter state below, and loading/unloading on the server
        self._live: tuple[int, str] | None = None  # (version, path) loaded as selfcog-v<version>; None = base
        self._failed: tuple[int, str] | None = None  # refused by the server: not retried until the store moves on
        self._error: str | None = None
        self._last_sync = float("-inf")
        self._candidates = itertools.count(1)
        self._pause = TrainingPause()  # while the server sleeps for a retrain
        if server is not None:
            server.on_restart = self._reload_live
        self.refresh_adapter()
        self._closed = threading.Event()
        # Idle or busy, the store is looked at every poll_s (requests look too, when it is due).
        threading.Thread(target=self._follow_store, name="engine-follow-store", daemon=True).start()

    # --- the Engine protocol ----------------------------------------------------------------------
    @property
    def adapter_version(self) -> int | None:
        live = self._live
        return live[0] if live else None

    @property
    def adapter_error(self) -> str | None:
        return self._error

    def stream(self, messages: Messages, *, max_new_tokens: int | None = None,
               sampling: Sampling | None = None) -> Reply:
        """Start one reply with the live adapter; iterate the Reply for its text as the server sends it."""
        self._pause.check()
        max_new_tokens = max_new_tokens or self.max_new_tokens
        body = {**self._request(messages, max_new_tokens, sampling), "stream": True,
                "stream_options": {"include_usage": True}}
        name, version = self._live_model()
        started = time.perf_counter()

        def pieces() -> Iterator[str]:  # runs as the Reply is read; `reply` exists by then
            try:
                yield from self._stream_pieces(body, name, reply)
            except EngineError as e:
                reply.error = e
            finally:
                reply.seconds = time.perf_counter() - started

        reply = Reply(pieces(), prompt_tokens=0)  # the server counts the prompt: set from its usage at the end
        reply.adapter_version = version
        return reply

    def generate(self, conversations: list[Messages], *, adapter: str | Path = AdapterRef.ACTIVE,
                 max_new_tokens: int | None = None, evaluation: bool = False) -> list[str]:
        """Greedy answers to many conversations, all sent at once; adapter picks live / base / a candidate folder.
        evaluation changes nothing: the server computes every answer in the precision it serves in."""
        self._pause.check()
        max_new_tokens = max_new_tokens or self.max_new_tokens
        bodies = [self._request(c, max_new_tokens, None) for c in conversations]
        if adapter == AdapterRef.BASE:
            return self._answers(bodies, self.base_name)
        if adapter == AdapterRef.ACTIVE:
            name, _ = self._live_model()
            try:
                return self._answers(bodies, name)
            except _UnknownModel:  # the server restarted and forgot it: load it again, once
                return self._answers(bodies, self._reload_live())
        return self._with_candidate(Path(adapter), lambda name: self._answers(bodies, name))

    def refresh_adapter(self) -> int | None:
        """Serve the store's active adapter now (instead of at the next poll) and return the live version."""
        self._sync_live(force=True)
        return self.adapter_version

    def close(self) -> None:
        self._closed.set()
        self._http.close()
        if self.server is not None:
            self.server.stop()

    @contextmanager
    def pause_for_training(self, expected_s: float | None = None, *, lend: bool = False):
        """Free the GPU for a retrain on the same card: the managed server sleeps, chats are told when it is
        back. Does nothing for a server that cannot sleep (CPU, or someone else's server)."""
        if self.server is None or not self.server.sleep_mode:
            yield None
            return
        self.server.sleep()
        self._pause.begin(expected_s)
        try:
            yield None
        finally:
            self.server.wake_up()
            self._pause.end()
            try:
                self._reload_live()  # in case the sleep dropped it
            except EngineError as e:  # adapter_error says so; the retrain's own outcome matters more here
                log.warning("after waking vLLM: %s", e)

    def expect_back_in(self, seconds: float) -> None:
        self._pause.expect_back_in(seconds)

    # --- adapters ---------------------------------------------------------------------------------
    def _live_model(self) -> tuple[str, int | None]:
        """The model name that serves the live adapter (or the base) and its version, after looking at the store if due."""
        self._sync_live()
        live = self._live
        return (_live_name(live[0]), live[0]) if live else (self.base_name, None)

    def _follow_store(self) -> None:
        while not self._closed.wait(max(self.poll_s, 0.2)):
            try:
                self._sync_live()
            except Exception as e:  # the server is down (the next request says so), or closing
                log.debug("could not follow the store: %s", e)

    def _sync_live(self, *, force: bool = False) -> None:
        """Make the store's active adapter the live one (loading it on the server); a refused one keeps the old."""
        with self._lock:
            if not force and time.monotonic() - self._last_sync < self.poll_s:
                return
            self._last_sync = time.monotonic()
            if self._active_adapter is None:
                return
            read, wanted = store_live_adapter(self._active_adapter)
            if not read:
                return
            if wanted == self._live:
                self._failed, self._error = None, None  # e.g. rolled back to what serves
                return
            if wanted is not None and wanted == self._failed:
                return  # it would be refused again; the error still says so
            started = time.perf_counter()
            if wanted is not None:
                try:
                    self._load(_live_name(wanted[0]), wanted[1])
                except _Refused as e:
                    self._failed = wanted
                    serving = f"v{self._live[0]}" if self._live else "the base model"
                    self._error = f"adapter v{wanted[0]} at {wanted[1]} could not be loaded ({e}); still serving {serving}"
                    log.error(self._error)
                    return
            previous, self._live, self._failed, self._error = self._live, wanted, None, None
            if previous is not None:
                self._unload(_live_name(previous[0]))
            log.info("now serving %s (swap took %.2f s)", f"adapter v{wanted[0]}" if wanted else "the base model",
                     time.perf_counter() - started)

    def _reload_live(self) -> str:
        """Load the live adapter again (the server restarted or woke up without it); returns its model name."""
        with self._lock:
            if self._live is not None:
                try:
                    self._load(_live_name(self._live[0]), self._live[1])
                except _Refused as e:
                    self._error = f"adapter v{self._live[0]} could not be loaded again ({e})"
                    raise EngineError(self._error) from None
        self._sync_live(force=True)
        return self._live_model()[0]

    def _with_candidate(self, folder: Path, use: Callable[[str], list[str]]) -> list[str]:
        """Load a folder under a name of its own for one batch, then unload it."""
        name = f"selfcog-candidate-{os.getpid()}-{next(self._candidates)}"
        try:
            self._load(name, str(folder.resolve()))
        except _Refused as e:
            raise EngineError(f"adapter {folder} could not be loaded ({e})") from None
        try:
            return use(name)
        finally:
            self._unload(name)

    def _load(self, name: str, path: str) -> None:
        """Load an adapter folder on the server under ``name``; _Refused says why not."""
        try:
            check_adapter_folder(path, self._model)  # a clear line before the server tries
        except AdapterFolderError as e:
            raise _Refused(str(e)) from None
        request = {"lora_name": name, "lora_path": path}
        response = self._call("POST", "/load_lora_adapter", json=request)
        if response.status_code == 400 and "already been loaded" in response.text:
            # another selfcog process sharing the server loaded it (versions are immutable: the same weights);
            # loading in place makes sure this name holds this path
            response = self._call("POST", "/load_lora_adapter", json={**request, "load_inplace": True})
        if response.status_code != 200:
            message = _message(response)
            # vLLM wraps the reason: "Call to add_lora method failed: Worker failed with error '<reason>', please ..."
            reason = re.search(r"failed with error '(.+?)'", message)
            raise _Refused(f"the server refused it: {reason[1] if reason else message}")
        log.info("loaded %s on the server as %s", path, name)

    def _unload(self, name: str) -> None:
        try:
            response = self._call("POST", "/unload_lora_adapter", json={"lora_name": name})
        except EngineError as e:  # the server is gone: nothing is loaded there any more
            log.warning("could not unload %s: %s", name, e)
            return
        if response.status_code not in (200, 404):  # 404: unloaded already (another process, a restart)
            log.warning("could not unload %s: %s", name, _message(response))

    # --- HTTP -------------------------------------------------------------------------------------
    def _request(self, messages: Messages, max_new_tokens: int, sampling: Sampling | None) -> dict:
        """The body of one chat completion, the prompt fitted to the context; greedy when sampling is None."""
        body = {"messages": self.fit_to_context(messages, max_new_tokens), "max_tokens": max_new_tokens}
        if sampling is None:
            return {**body, "temperature": 0}
        return {**body, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "repetition_penalty": sampling.repetition_penalty,  # a vLLM extension of the OpenAI API
                **({"seed": sampling.seed} if sampling.seed is not None else {})}

    def _stream_pieces(self, body: dict, name: str, reply: Reply) -> Iterator[str]:
        try:
            yield from self._stream_events(body, name, reply)
        except _UnknownModel:
            if name == self.base_name:
                raise
            name = self._reload_live()  # the server restarted and forgot the live adapter: load it, once more
            reply.adapter_version = self.adapter_version
            yield from self._stream_events(body, name, reply)

    def _stream_events(self, body: dict, name: str, reply: Reply) -> Iterator[str]:
        try:
            with self._http.stream("POST", "/chat/completions", json={**body, "model": name}) as response:
                if response.status_code != 200:
                    response.read()
                    raise self._failure(response, name)
                for line in response.iter_lines():
                    event = _event(line)
                    if event is None:
                        continue
                    if event.get("usage"):
                        reply.prompt_tokens = event["usage"]["prompt_tokens"]
                        reply.completion_tokens = event["usage"]["completion_tokens"]
                    for choice in event.get("choices", []):
                        if text := choice.get("delta", {}).get("content"):
                            yield text
                    if reply.cancelled:
                        return  # leaving the block closes the connection: the server stops this reply
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None

    def _answers(self, bodies: list[dict], name: str) -> list[str]:
        """One greedy completion per body, all in flight at once (the server batches them).

        Threads, not asyncio: the caller may already run an event loop (a Gradio or PTB handler, a test
        with Playwright's sync API), where asyncio.run() is refused."""

        def answer(body: dict) -> str:
            response = self._call("POST", "/chat/completions", json={**body, "model": name})
            if response.status_code != 200:
                raise self._failure(response, name)
            return (response.json()["choices"][0]["message"]["content"] or "").strip()

        if not bodies:
            return []
        with ThreadPoolExecutor(max_workers=min(len(bodies), IN_FLIGHT), thread_name_prefix="vllm-generate") as pool:
            return list(pool.map(answer, bodies))

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None

    def _find_base_model(self, wanted: str | None) -> tuple[str, int | None]:
        """The base model's name on the server (and its context length), from GET /v1/models."""
        response = self._call("GET", "/models")
        if response.status_code != 200:
            raise EngineError(f"the server at {self.base_url} answered {response.status_code} to GET /models: "
                              f"{_message(response)}")
        bases = {m["id"]: m for m in response.json().get("data", []) if not m.get("parent")}
        if wanted is None and len(bases) == 1:
            wanted = next(iter(bases))
        if wanted not in bases:
            listed = ", ".join(bases) or "none"
            raise EngineError(f"the server at {self.base_url} does not serve {wanted or 'a single model'!r} "
                              f"(it serves: {listed}); set SELFCOG_OPENAI_MODEL to one of them")
        return wanted, bases[wanted].get("max_model_len")

    def _unreachable(self, e: httpx.HTTPError) -> EngineError:
        reason = self.server.down_reason() if self.server is not None else None
        return EngineError(reason or f"the model server at {self.base_url} is not reachable "
                                     f"({type(e).__name__}: {e or 'no answer'})")

    def _failure(self, response: httpx.Response, name: str) -> EngineError:
        if response.status_code == 404:
            return _UnknownModel(f"the server at {self.base_url} does not know the model {name!r}: {_message(response)}")
        return EngineError(f"the server at {self.base_url} answered {response.status_code}: {_message(response)}")

    # The prompt fitting is the local engine's (it only needs tokenizer, count_tokens and max_context_tokens).
    encode = LocalEngine.encode
    count_tokens = LocalEngine.count_tokens
    fit_to_context = LocalEngine.fit_to_context


class _Refused(Exception):
    """The server (or the folder check before it) would not load an adapter; the message says why."""


class _UnknownModel(EngineError):
    """The server answered 404 for a model name (an adapter it no longer has loaded, after a restart)."""


def _live_name(version: int) -> str:
    return f"selfcog-v{version}"


def _event(line: str) -> dict | None:
    """One server-sent event's JSON, or None for keep-alives and the final [DONE]; raises the server's error."""
    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
        return None
    event = json.loads(line[5:])
    if "error" in event:  # vLLM reports a failure after the 200 as an event
        raise EngineError(f"the server stopped the reply: {event['error'].get('message', event['error'])}")
    return event


def _message(response: httpx.Response) -> str:
    """The error message in a server's JSON answer (OpenAI style, or FastAPI's detail), else its text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    error = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]


# --- the two ways make_engine builds one ------------------------------------------------------------

def managed_vllm(settings, model: ResolvedModel, *, active_adapter=None) -> OpenAIEngine:
    """SELFCOG_ENGINE=vllm: start vLLM on loopback for ``model`` and serve through it."""
    from finetune.train import recipe_for

    device = _device(settings.device)
    server = VLLMServer(model.path, log_path=Path(settings.data_dir) / "logs" / "vllm.log",
                        max_lora_rank=_vllm_rank(recipe_for(model, device).lora_rank),
                        sleep_mode=device.startswith("cuda"), extra_args=os.environ.get("SELFCOG_VLLM_ARGS", ""))
    server.start()
    try:
        return OpenAIEngine(model, server.base_url, served_model=SERVED_NAME, active_adapter=active_adapter,
                            server=server, device=device, max_new_tokens=settings.max_new_tokens)
    except BaseException:
        server.stop()
        raise


def attached(settings, model: ResolvedModel, *, active_adapter=None) -> OpenAIEngine:
    """SELFCOG_ENGINE=openai: serve through a server someone else runs, at SELFCOG_OPENAI_BASE_URL."""
    base_url = os.environ.get("SELFCOG_OPENAI_BASE_URL")
    if not base_url:
        raise EngineError("SELFCOG_ENGINE=openai needs SELFCOG_OPENAI_BASE_URL (e.g. http://gpu-box:8000/v1)")
    return OpenAIEngine(model, base_url, api_key=os.environ.get("SELFCOG_OPENAI_API_KEY") or None,
                        served_model=os.environ.get("SELFCOG_OPENAI_MODEL") or None, active_adapter=active_adapter,
                        device=_device(settings.device), max_new_tokens=settings.max_new_tokens)


def _device(setting: str) -> str:
    """Where a retrain runs: SELFCOG_DEVICE, 'auto' = cuda when this machine has it."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _vllm_rank(rank: int) -> int:
    """vLLM's --max-lora-rank takes only some values: the smallest one that holds ``rank``."""
    return next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)
