"""The chat engine: one base model per process, the live LoRA adapter, streamed replies.

    >>> engine = LocalEngine(resolve_model("embedded", "data/cache"), active_adapter=store.adapters.active)
    >>> reply = engine.stream([{"role": "user", "content": "Who are you?"}])
    >>> "".join(reply), reply.adapter_version, reply.completion_tokens
    ('I am ...', 3, 17)

``Engine`` is the small interface the chat service and the evaluator use; ``LocalEngine`` runs
transformers + peft in this process. An OpenAI-compatible server (vLLM, ``swift deploy``) can sit
behind the same four methods later.

All model work (generation, adapter swaps) happens on one worker thread, so a swap never lands in
the middle of a reply: it happens between jobs. When idle the worker asks ``active_adapter()``
(a callable, normally the store's) every ``poll_s`` seconds, and again before every job, so an
adapter activated by any process is serving within about a second, without reloading the base.
The live adapter is merged into the base weights (unmerged LoRA decodes several times slower) and
unmerged again before the next swap.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Protocol

from bot.models import ModelNotFound, ResolvedModel

log = logging.getLogger(__name__)

Messages = list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]


class EngineError(Exception):
    """Generation failed; the message is meant for the user."""


class AdapterRef:
    """Which weights a batch is generated with: the live adapter, the bare base, or a folder."""

    ACTIVE = "active"
    BASE = "base"


class Reply:
    """A reply being generated. Iterate for text pieces; once done, the stats are filled in."""

    def __init__(self, pieces: Iterator[str], prompt_tokens: int):
        self._pieces = pieces
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.adapter_version: int | None = None
        self.first_token_s: float | None = None
        self.seconds: float | None = None
        self.cancelled = False
        self.error: BaseException | None = None
        self._started = time.perf_counter()
        self._done = threading.Event()  # set by the worker once the stats are final

    def __iter__(self) -> Iterator[str]:
        finished = False
        try:
            for piece in self._pieces:
                if self.first_token_s is None and piece:
                    self.first_token_s = time.perf_counter() - self._started
                yield piece
            finished = True
        finally:
            if not finished:
                self.cancelled = True  # the consumer stopped reading: stop generating too
        self._done.wait()
        if self.error is not None:
            raise EngineError(f"generation failed: {self.error}") from self.error

    def cancel(self) -> None:
        self.cancelled = True


class Engine(Protocol):
    name: str

    @property
    def adapter_version(self) -> int | None: ...

    def stream(self, messages: Messages, *, max_new_tokens: int | None = None, temperature: float = 0.0) -> Reply: ...

    def generate(self, conversations: list[Messages], *, adapter: str | Path = AdapterRef.ACTIVE,
                 max_new_tokens: int | None = None, temperature: float = 0.0) -> list[str]: ...

    def close(self) -> None: ...


class LocalEngine:
    """transformers + peft in this process. See the module docstring."""

    def __init__(self, model: ResolvedModel, *, active_adapter: Callable[[], dict | None] | None = None,
                 device: str = "auto", dtype: str = "auto", max_new_tokens: int = 256,
                 max_context_tokens: int = 2048, poll_s: float = 1.0, merge: bool = True, batch_size: int = 16):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not log.isEnabledFor(logging.INFO):
            transformers.utils.logging.disable_progress_bar()  # keep `selfcog ask --json` output clean
        self.name = model.name
        self.model_path = model.path
        self.max_new_tokens = max_new_tokens
        self.poll_s = poll_s
        self.merge = merge
        self.batch_size = batch_size
        self._active_adapter = active_adapter
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        torch_dtype = {"auto": torch.bfloat16 if self.device.startswith("cuda") else torch.float32,
                       "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        started = time.perf_counter()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model.path)
            self.base = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch_dtype).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise ModelNotFound(f"could not load the model at {model.path}: {e}") from None
        self.tokenizer.padding_side = "left"  # batched generation appends to the right
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        limit = getattr(self.base.config, "max_position_embeddings", None) or max_context_tokens
        self.max_context_tokens = min(max_context_tokens, limit)
        log.info("loaded %s on %s (%s) in %.1f s", self.name, self.device, torch_dtype, time.perf_counter() - started)

        self._peft = None  # PeftModel wrapping self.base once the first adapter is loaded
        self._live: tuple[int, str] | None = None  # (version, path) of the adapter serving now
        self._merged = False  # the live adapter's weights are folded into the base weights
        self._candidates = 0  # candidate adapters get fresh names: peft cannot reload under a used one
        self._failed: tuple[int, str] | None = None  # last adapter that would not load: don't retry it
        self.adapter_error: str | None = None
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._worker.start()
        self.refresh_adapter()

    # --- public interface -----------------------------------------------------------------------
    @property
    def adapter_version(self) -> int | None:
        return self._live[0] if self._live else None

    def stream(self, messages: Messages, *, max_new_tokens: int | None = None, temperature: float = 0.0) -> Reply:
        """Start generating a reply; iterate the returned Reply for its text as it arrives."""
        from transformers import StoppingCriteria, TextIteratorStreamer

        max_new_tokens = max_new_tokens or self.max_new_tokens
        input_ids = self.encode(self.fit_to_context(messages, max_new_tokens))
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = Reply(iter(streamer), prompt_tokens=len(input_ids))

        class StopWhenCancelled(StoppingCriteria):
            def __call__(self, *_args, **_kwargs):
                return reply.cancelled

        def job() -> None:
            import torch

            reply.adapter_version = self.adapter_version
            try:
                ids = torch.tensor([input_ids], device=self.device)
                output = self._model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                    stopping_criteria=[StopWhenCancelled()], **self._sampling(max_new_tokens, temperature))
                reply.completion_tokens = int(output.shape[1] - ids.shape[1])
            except Exception as e:  # reported to the consumer through the Reply
                log.exception("generation failed")
                reply.error = e
                streamer.end()
            reply.seconds = time.perf_counter() - reply._started
            reply._done.set()

        self._submit(job)
        return reply

    def generate(self, conversations: list[Messages], *, adapter: str | Path = AdapterRef.ACTIVE,
                 max_new_tokens: int | None = None, temperature: float = 0.0) -> list[str]:
        """Answer many conversations at once (batched); adapter picks live / base / a candidate folder."""
        max_new_tokens = max_new_tokens or self.max_new_tokens
        prompts = [self.encode(self.fit_to_context(c, max_new_tokens)) for c in conversations]
        return self._submit(lambda: self._generate_batches(prompts, adapter, max_new_tokens, temperature)).result()

    def refresh_adapter(self) -> int | None:
        """Look at the active adapter now (instead of at the next poll) and return the live version."""
        self._submit(self._sync_adapter).result()
        return self.adapter_version

    def close(self) -> None:
        self._closed = True
        self._jobs.put(None)
        self._worker.join(timeout=30)

    # --- prompt handling --------------------------------------------------------------------------
    def encode(self, messages: Messages) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def count_tokens(self, messages: Messages) -> int:
        return len(self.encode(messages))

    def fit_to_context(self, messages: Messages, max_new_tokens: int) -> Messages:
        """Drop the oldest turns (never the system prompt or the newest message) until the prompt fits."""
        budget = self.max_context_tokens - max_new_tokens
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        while len(turns) > 1 and self.count_tokens(system + turns) > budget:
            turns = turns[2:] if len(turns) > 2 else turns[1:]  # drop a user+assistant pair at a time
        if self.count_tokens(system + turns) > budget:
            # A single message longer than the window: keep its end, which is what gets answered.
            last = dict(turns[-1])
            ids = self.tokenizer(last["content"], add_special_tokens=False)["input_ids"]
            keep = max(16, budget - self.count_tokens(system + [{**last, "content": ""}]))
            last["content"] = self.tokenizer.decode(ids[-keep:])
            turns = [last]
        return system + turns

    # --- the worker thread --------------------------------------------------------------------------
    def _submit(self, fn: Callable[[], object]) -> Future:
        if self._closed:
            raise EngineError("the engine is shut down")
        future: Future = Future()

        def job() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

        self._jobs.put(job)
        return future

    def _work(self) -> None:
        while not self._closed:
            try:
                job = self._jobs.get(timeout=self.poll_s)
            except queue.Empty:
                self._sync_adapter()
                continue
            if job is None:
                return
            self._sync_adapter()
            job()

    @property
    def _model(self):
        return self._peft if self._peft is not None else self.base

    def _sampling(self, max_new_tokens: int, temperature: float) -> dict:
        kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
                  "eos_token_id": self.tokenizer.eos_token_id}
        if temperature and temperature > 0:
            return {**kwargs, "do_sample": True, "temperature": temperature, "top_p": 0.95}
        return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}

    def _generate_batches(self, prompts: list[list[int]], adapter, max_new_tokens: int, temperature: float) -> list[str]:
        import torch

        with self._adapter_for_batch(adapter):
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
            answers: list[str] = [""] * len(prompts)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                batch = self.tokenizer.pad({"input_ids": [prompts[i] for i in chunk]}, return_tensors="pt").to(self.device)
                with torch.inference_mode():
                    output = self._model.generate(**batch, **self._sampling(max_new_tokens, temperature))
                for row, i in enumerate(chunk):
                    answers[i] = self.tokenizer.decode(output[row, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        return answers

    # --- adapters -------------------------------------------------------------------------------------
    def _sync_adapter(self) -> None:
        """Make the live adapter match what the store says is active (runs on the worker thread)."""
        if self._active_adapter is None:
            return
        try:
            row = self._active_adapter()
        except Exception as e:  # a locked or missing database must not stop chat
            log.warning("could not read the active adapter: %s", e)
            return
        wanted = (row["version"], row["path"]) if row else None
        if wanted == self._live or (wanted is not None and wanted == self._failed):
            return
        try:
            self._swap_to(wanted)
            self._failed, self.adapter_error = None, None
        except Exception as e:
            self._failed = wanted
            serving = f"v{self._live[0]}" if self._live else "the base model"
            self.adapter_error = f"adapter v{wanted[0]} at {wanted[1]} could not be loaded ({e}); still serving {serving}"
            log.error(self.adapter_error)

    def _swap_to(self, wanted: tuple[int, str] | None) -> None:
        started = time.perf_counter()
        if wanted is not None:
            self._load(f"v{wanted[0]}", wanted[1])  # raises before anything changes if the folder is bad
        self._unmerge()
        if wanted is None:
            if self._peft is not None:
                # peft cannot hold zero adapters: the old one stays loaded, switched off.
                self._peft.base_model.disable_adapter_layers()
        else:
            self._peft.base_model.enable_adapter_layers()
            self._peft.set_adapter(f"v{wanted[0]}")
            self._drop_adapters_except(f"v{wanted[0]}")
        self._live = wanted
        self._merge()
        log.info("now serving %s (swap took %.2f s)", f"adapter v{wanted[0]}" if wanted else "the base model",
                 time.perf_counter() - started)

    def _load(self, name: str, path: str) -> None:
        """Load an adapter under a name (versions are immutable, so a loaded name is never reloaded)."""
        from peft import PeftModel

        check_adapter_folder(path)
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.base, path, adapter_name=name, is_trainable=False)
            self._peft.eval()
        elif name not in self._peft.peft_config:
            try:
                self._peft.load_adapter(path, adapter_name=name, is_trainable=False)
            except Exception:
                if name in self._peft.peft_config and len(self._peft.peft_config) > 1:
                    self._peft.delete_adapter(name)
                raise

    def _drop_adapters_except(self, keep: str) -> None:
        for name in list(self._peft.peft_config):
            if name != keep:
                self._peft.delete_adapter(name)

    def _merge(self) -> None:
        if self.merge and self._live is not None and not self._merged:
            self._peft.merge_adapter()
            self._merged = True

    def _unmerge(self) -> None:
        if self._merged:
            self._peft.unmerge_adapter()
            self._merged = False

    @contextmanager
    def _adapter_for_batch(self, adapter: str | Path):
        """Set the weights for one batch job (live, base or a candidate folder); restore the live ones after."""
        if adapter == AdapterRef.ACTIVE or (adapter == AdapterRef.BASE and self._live is None):
            yield
            return
        self._unmerge()
        try:
            if adapter == AdapterRef.BASE:
                with self._peft.disable_adapter():
                    yield
            else:
                self._candidates += 1
                name = f"candidate-{self._candidates}"
                self._load(name, str(adapter))
                self._peft.base_model.enable_adapter_layers()
                self._peft.set_adapter(name)
                yield
        finally:
            if self._live is not None:
                self._peft.set_adapter(f"v{self._live[0]}")
                self._drop_adapters_except(f"v{self._live[0]}")
                self._merge()
            elif self._peft is not None:
                self._peft.base_model.disable_adapter_layers()


def check_adapter_folder(path: str | Path) -> None:
    """Raise a clear error for a missing or corrupt adapter folder before peft sees it."""
    import json

    folder = Path(path)
    config = folder / "adapter_config.json"
    weights = [folder / "adapter_model.safetensors", folder / "adapter_model.bin"]
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if not config.exists() or not any(w.exists() for w in weights):
        raise ValueError(f"{folder} is not a LoRA adapter (needs adapter_config.json and adapter_model.safetensors)")
    try:
        json.loads(config.read_text())
    except ValueError:
        raise ValueError(f"{config} is not valid JSON") from None
    if weights[0].exists():
        from safetensors import safe_open

        try:
            with safe_open(str(weights[0]), framework="pt") as f:
                list(f.keys())
        except Exception as e:
            raise ValueError(f"{weights[0]} is corrupt ({e})") from None
