"""The chat engine: one base model per process, the live LoRA adapter, streamed replies.

    >>> engine = LocalEngine(resolve_model("embedded", "data/cache"), active_adapter=store.adapters.active)
    >>> reply = engine.stream([{"role": "user", "content": "Who are you?"}])
    >>> "".join(reply), reply.adapter_version, reply.completion_tokens
    ('I am ...', 3, 17)

``Engine`` is the small interface the chat service and the evaluator use; ``LocalEngine`` runs
transformers + peft in this process. An OpenAI-compatible server (vLLM, ``swift deploy``) can sit
behind the same four methods later.

All model work happens on one worker thread, which runs a continuous-batching scheduler:

- Every request (a streamed chat reply, or each conversation of a ``generate`` batch) becomes a
  ``_Sequence`` and waits in one first-come-first-served queue.
- Each step the worker admits waiting sequences into free cache slots (prefilling their prompts
  together, padded, in one forward, which gives each its first token), then decodes one more token
  for *all* running sequences in a single batched forward (``bot.decoder``). A new chat joins at the
  next step boundary instead of waiting for the replies already running to finish.
- All sequences in a step share one set of weights: the live adapter merged into the base, the
  bare base, or a candidate folder (``generate(adapter=...)``). A request for other weights waits
  until the running ones drain, then the weights change and its group runs; requests behind it
  wait for it (first come, first served, so neither chat nor evaluation can starve the other).
- The live adapter is polled from the store (``active_adapter()``) every ``poll_s`` seconds, busy or
  idle, and before admitting into an idle engine. A new adapter is swapped in at a step boundary
  without reloading the base: unmerge the old LoRA, load and merge the new one. Replies running at
  that moment finish on the new weights; ``Reply.adapter_version`` is the version their prompt was
  read with.

Greedy decoding is deterministic, and ``stream`` and ``generate`` run the same code path, so a
conversation gets the same answer through either when it is decoded in the same company. In other
company it can differ: a batched step's floating-point sums depend on the batch size in their last
bits, and a near-tie between two tokens can go the other way (rare in fp32 on the CPU; frequent in
bf16 on random weights; bench/NOTES.md).
"""

from __future__ import annotations

import os

# The serving process shares its cores with the trainer subprocess (and, here, with everything else).
# OpenMP's default spin-waiting then makes every matrix product 10-40x slower (measured, bench/RESULTS.md);
# passive waiting costs little when the cores are idle. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402
import queue  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Iterator, Protocol  # noqa: E402

from bot.models import ModelNotFound, ResolvedModel  # noqa: E402

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
    """transformers + peft in this process, with a continuous-batching scheduler. See the module docstring."""

    def __init__(self, model: ResolvedModel, *, active_adapter: Callable[[], dict | None] | None = None,
                 device: str = "auto", dtype: str = "auto", max_new_tokens: int = 256,
                 max_context_tokens: int = 2048, poll_s: float = 1.0, merge: bool = True,
                 batch_size: int | None = None, cuda_graphs: bool = True):
        """batch_size: how many replies decode together (cache slots); None = up to 64, as memory allows.
        merge=False keeps LoRA unmerged (transformers' own forward, one reply at a time: slow, for debugging)."""
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from bot.decoder import HFDecoder, make_decoder

        if not log.isEnabledFor(logging.INFO):
            transformers.utils.logging.disable_progress_bar()  # keep `selfcog ask --json` output clean
        self.name = model.name
        self.model_path = model.path
        self.max_new_tokens = max_new_tokens
        self.poll_s = poll_s
        self.merge = merge
        self._active_adapter = active_adapter
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        torch_dtype = {"auto": torch.bfloat16 if self.device.startswith("cuda") else torch.float32,
                       "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        started = time.perf_counter()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model.path)
            on_gpu = {"device_map": self.device} if self.device.startswith("cuda") else {}  # straight to the GPU
            self.base = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch_dtype, **on_gpu).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise ModelNotFound(f"could not load the model at {model.path}: {e}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        limit = getattr(self.base.config, "max_position_embeddings", None) or max_context_tokens
        self.max_context_tokens = min(max_context_tokens, limit)
        self._stop_ids = _stop_token_ids(self.tokenizer, self.base)
        self.batch_size = batch_size or _default_batch_size(self.base, self.device, self.max_context_tokens)
        if merge:
            self._decoder = make_decoder(self.base, capacity=self.batch_size, max_len=self.max_context_tokens,
                                         cuda_graphs=cuda_graphs)
        else:
            self._decoder = HFDecoder(self.base, capacity=self.batch_size, max_len=self.max_context_tokens)
        log.info("loaded %s on %s (%s, %s, %d slots) in %.1f s", self.name, self.device, torch_dtype,
                 type(self._decoder).__name__, self.batch_size, time.perf_counter() - started)

        self._peft = None  # PeftModel wrapping self.base once the first adapter is loaded
        self._live: tuple[int, str] | None = None  # (version, path) of the adapter serving now
        self._merged = False  # the active peft adapter's weights are folded into the base weights
        self._candidates = 0  # candidate adapters get fresh names: peft cannot reload under a used one
        self._failed: tuple[int, str] | None = None  # last adapter that would not load: don't retry it
        self.adapter_error: str | None = None
        # the scheduler's state (touched only by the worker thread, except the inbox)
        self._inbox: queue.Queue[_Sequence | _Control | list[_Sequence] | None] = queue.Queue()
        self._waiting: deque[_Sequence | _Control] = deque()  # first come, first served
        self._running: list[_Sequence] = []  # index == cache slot
        self._weights = AdapterRef.ACTIVE  # what the base weights hold now: ACTIVE, BASE or a candidate folder
        self._last_poll = 0.0
        self._stopping = False
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
        max_new_tokens = max_new_tokens or self.max_new_tokens
        prompt = self.encode(self.fit_to_context(messages, max_new_tokens))
        pieces: queue.Queue[str | None] = queue.Queue()
        reply = Reply(iter(pieces.get, None), prompt_tokens=len(prompt))
        self._put(_Sequence(prompt, max_new_tokens, temperature, AdapterRef.ACTIVE, reply=reply, pieces=pieces))
        return reply

    def generate(self, conversations: list[Messages], *, adapter: str | Path = AdapterRef.ACTIVE,
                 max_new_tokens: int | None = None, temperature: float = 0.0) -> list[str]:
        """Answer many conversations at once (batched); adapter picks live / base / a candidate folder."""
        max_new_tokens = max_new_tokens or self.max_new_tokens
        weights = adapter if adapter in (AdapterRef.ACTIVE, AdapterRef.BASE) else str(Path(adapter))
        batch = _Batch(len(conversations))
        prompts = [self.encode(self.fit_to_context(c, max_new_tokens)) for c in conversations]
        self._put([_Sequence(prompt, max_new_tokens, temperature, weights, on_done=batch.finisher(i))
                   for i, prompt in enumerate(prompts)])  # all at once: they are admitted together
        return [self.tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in batch.result()]

    def refresh_adapter(self) -> int | None:
        """Look at the active adapter now (instead of at the next poll) and return the live version."""
        control = _Control(self._sync_adapter)
        self._put(control)
        control.future.result()
        return self.adapter_version

    def close(self) -> None:
        self._closed = True
        self._inbox.put(None)
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

    # --- the scheduler (worker thread) ------------------------------------------------------------
    def _put(self, item: _Sequence | _Control | list[_Sequence]) -> None:
        if self._closed:
            raise EngineError("the engine is shut down")
        self._inbox.put(item)

    def _work(self) -> None:
        """One loop turn = one step boundary: take requests, maybe change weights, admit, decode a token."""
        while not self._stopping:
            try:
                self._collect(wait=not self._running and not self._waiting)
                if not self._running:
                    self._start_next_group()
                self._admit()
                if self._running:
                    self._step()
                if self._weights == AdapterRef.ACTIVE and time.monotonic() - self._last_poll >= self.poll_s:
                    self._sync_adapter()
            except Exception as e:  # the worker must survive anything: fail what was running, go on
                log.exception("engine worker step failed")
                for slot, s in enumerate(self._running):
                    s.error = s.error or e
                    self._finish(s)
                    self._decoder.release(slot)
                self._running = []
        self._shut_down()

    def _collect(self, wait: bool) -> None:
        """Move new requests from the inbox to the waiting line (waiting up to poll_s when idle)."""
        try:
            item = self._inbox.get(timeout=self.poll_s) if wait else self._inbox.get_nowait()
            while True:
                if item is None:
                    self._stopping = True
                else:
                    self._waiting.extend(item if isinstance(item, list) else [item])
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _start_next_group(self) -> None:
        """Nothing is running: put in place the weights the oldest waiting request needs."""
        while self._waiting and self._waiting[0].cancelled:
            self._finish(self._waiting.popleft())
        wanted = self._waiting[0].weights if self._waiting else AdapterRef.ACTIVE
        try:
            self._use_weights(wanted)
        except Exception as e:  # a candidate folder that will not load: fail the requests that asked for it
            log.warning("could not use adapter %s: %s", wanted, e)
            for item in [w for w in self._waiting if w.weights == wanted]:
                self._waiting.remove(item)
                item.error = e
                self._finish(item)
            self._use_weights(AdapterRef.ACTIVE)
            return
        if wanted == AdapterRef.ACTIVE and self._waiting:
            self._sync_adapter()  # look at the store before serving after an idle spell

    def _admit(self) -> None:
        """Prefill waiting requests for the current weights into free slots, oldest first, several per forward."""
        group: list[_Sequence] = []
        while self._waiting and self._fits(self._waiting[0].weights):
            item = self._waiting[0]
            if isinstance(item, _Control):  # runs in its turn: after the requests before it are in
                self._prefill(group)
                group = []
                self._waiting.popleft().run()
                continue
            if len(self._running) + len(group) >= self.batch_size:
                break
            padded = max(len(s.prompt) for s in [item, *group]) * (len(group) + 1)
            if group and padded > self._decoder.prefill_tokens:
                self._prefill(group)
                group = []
                continue
            self._waiting.popleft()
            if item.cancelled:
                self._finish(item)
            else:
                group.append(item)
        self._prefill(group)
        self._retire_finished()

    def _prefill(self, group: list[_Sequence]) -> None:
        """Put a group of new sequences in the next free slots; their prompts' forward gives their first tokens."""
        if not group:
            return
        first_slot = len(self._running)
        for s in group:
            if s.reply is not None:
                s.reply.adapter_version = self.adapter_version if s.weights == AdapterRef.ACTIVE else None
            self._running.append(s)
        try:
            logits = self._decoder.prefill(list(range(first_slot, first_slot + len(group))), [s.prompt for s in group])
            for s, token in zip(group, self._pick(logits, group)):
                s.cache_len = len(s.prompt)
                self._accept(s, token)
        except Exception as e:
            log.exception("prefill failed")
            for s in group:
                s.error = e

    def _fits(self, weights: str) -> bool:
        """Can a request for these weights run now? (The bare base is the live weights when none is live.)"""
        return weights == self._weights or (weights == AdapterRef.BASE and self._live is None
                                            and self._weights == AdapterRef.ACTIVE)

    def _step(self) -> None:
        """Decode one token for every running sequence in one batched forward."""
        rows = self._running
        try:
            logits = self._decoder.decode([s.tokens[-1] for s in rows], [s.cache_len for s in rows])
            for s in rows:
                s.cache_len += 1
            for s, token in zip(rows, self._pick(logits, rows)):
                self._accept(s, token)
        except Exception as e:  # reported to every consumer of this step
            log.exception("decode step failed")
            for s in rows:
                s.error = e
        self._retire_finished()

    def _pick(self, logits, seqs: list[_Sequence]) -> list[int]:
        """The next token of each row: argmax when greedy, else temperature + top-p 0.95 sampling."""
        import torch

        chosen = logits.argmax(-1)
        for i, s in enumerate(seqs):
            if s.temperature and s.temperature > 0:
                probs = torch.softmax(logits[i] / s.temperature, -1)
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(-1) - sorted_probs < 0.95  # the smallest set reaching top_p
                sorted_probs = sorted_probs * keep
                chosen[i] = order[torch.multinomial(sorted_probs, 1)[0]]
        return chosen.tolist()

    def _accept(self, s: _Sequence, token: int) -> None:
        """Record a sequence's new token; stream its text; mark it finished at a stop token or a limit."""
        s.generated += 1
        if token in self._stop_ids:
            s.done = True
            return
        s.tokens.append(token)
        if s.pieces is not None:
            text = self.tokenizer.decode(s.tokens, skip_special_tokens=True)
            # hold back a half-decoded character, and text the tokenizer may still rewrite
            if text.startswith(s.sent) and not text.endswith("\ufffd") and len(text) > len(s.sent):
                s.pieces.put(text[len(s.sent):])
                s.sent = text
        if s.generated >= s.max_new_tokens or s.cache_len + 1 >= self.max_context_tokens:
            s.done = True

    def _retire_finished(self) -> None:
        """Finish done, cancelled and failed sequences; keep the running ones packed in slots 0..n-1."""
        i = 0
        while i < len(self._running):
            s = self._running[i]
            if not (s.done or s.cancelled or s.error):
                i += 1
                continue
            self._finish(s)
            last = self._running.pop()
            if last is s:
                self._decoder.release(i)
            else:  # the last sequence moves into the hole
                self._decoder.move(len(self._running), i, last.cache_len)
                self._running[i] = last

    def _finish(self, item: _Sequence | _Control) -> None:
        if isinstance(item, _Control):
            item.future.set_exception(item.error or EngineError("the engine is shut down"))
            return
        if item.reply is not None:
            reply = item.reply
            if item.pieces is not None and not item.error:
                text = self.tokenizer.decode(item.tokens, skip_special_tokens=True)
                if text.startswith(item.sent) and len(text) > len(item.sent):
                    item.pieces.put(text[len(item.sent):])
            reply.completion_tokens = item.generated
            reply.error = item.error
            reply.seconds = time.perf_counter() - reply._started
            reply._done.set()
            item.pieces.put(None)
        if item.on_done is not None:
            item.on_done(item)

    def _shut_down(self) -> None:
        for item in [*self._running, *self._waiting]:
            item.error = item.error or EngineError("the engine is shut down")
            self._finish(item)
        self._running, self._waiting = [], deque()

    # --- weights: live adapter, base, candidates --------------------------------------------------
    def _use_weights(self, wanted: str) -> None:
        """Make the base weights hold what a group of requests asked for (runs only between groups)."""
        if wanted == AdapterRef.BASE and self._live is None:
            wanted = AdapterRef.ACTIVE  # the same weights: no switch needed
        if wanted == self._weights:
            return
        if wanted not in (AdapterRef.ACTIVE, AdapterRef.BASE):
            self._candidates += 1
            name = f"candidate-{self._candidates}"
            self._load(name, wanted)  # raises with the weights as they were if the folder is bad
        self._unmerge()
        if wanted == AdapterRef.ACTIVE:
            self._restore_live()
        elif wanted == AdapterRef.BASE:
            self._peft.base_model.disable_adapter_layers()
        else:
            self._peft.base_model.enable_adapter_layers()
            self._peft.set_adapter(name)
            self._merge()
        self._weights = wanted
        self._decoder.weights_changed()

    def _restore_live(self) -> None:
        if self._peft is None:
            return
        if self._live is not None:
            self._peft.base_model.enable_adapter_layers()
            self._peft.set_adapter(f"v{self._live[0]}")
            self._drop_adapters_except(f"v{self._live[0]}")
            self._merge()
        else:
            # peft cannot hold zero adapters: the last one used stays loaded, switched off.
            self._drop_adapters_except(self._peft.active_adapter)
            self._peft.base_model.disable_adapter_layers()

    def _sync_adapter(self) -> None:
        """Make the live adapter match what the store says is active (worker thread, live weights in place)."""
        self._last_poll = time.monotonic()
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
            self._load(f"v{wanted[0]}", wanted[1])  # raises with the weights as they were if the folder is bad
        self._unmerge()
        self._live = wanted
        self._restore_live()
        self._decoder.weights_changed()
        log.info("now serving %s (swap took %.2f s)", f"adapter v{wanted[0]}" if wanted else "the base model",
                 time.perf_counter() - started)

    def _load(self, name: str, path: str) -> None:
        """Load an adapter under a name (versions are immutable, so a loaded name is never reloaded)."""
        check_adapter_folder(path)
        # peft unmerges silently when it injects an adapter into a merged model: unmerge first, and put
        # the merged weights back if loading fails.
        was_merged = self._merged
        self._unmerge()
        try:
            self._load_unmerged(name, path)
        except Exception:
            if was_merged:
                self._merge()
            raise

    def _load_unmerged(self, name: str, path: str) -> None:
        from peft import PeftModel

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.base, path, adapter_name=name, is_trainable=False)
            self._peft.eval()
            self._peft.base_model.disable_adapter_layers()  # nothing changes until it is switched on
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
        if self.merge and not self._merged:
            self._peft.merge_adapter()
            self._merged = True

    def _unmerge(self) -> None:
        if self._merged:
            self._peft.unmerge_adapter()
            self._merged = False


class _Sequence:
    """One reply being generated: what the scheduler tracks for each request."""

    def __init__(self, prompt: list[int], max_new_tokens: int, temperature: float, weights: str, *,
                 reply: Reply | None = None, pieces: queue.Queue | None = None,
                 on_done: Callable[[_Sequence], None] | None = None):
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.weights = weights  # AdapterRef.ACTIVE, AdapterRef.BASE or a candidate adapter folder
        self.reply, self.pieces = reply, pieces  # stream(): the consumer's Reply and its text queue
        self.on_done = on_done  # generate(): told when this sequence ends
        self.tokens: list[int] = []  # generated so far, stop token excluded
        self.generated = 0  # tokens produced, stop token included (as transformers counts them)
        self.cache_len = 0  # positions of this sequence held in its cache slot
        self.sent = ""  # text already streamed
        self.done = False
        self.error: BaseException | None = None

    @property
    def cancelled(self) -> bool:
        return self.reply is not None and self.reply.cancelled


class _Control:
    """A function to run on the worker between steps with the live weights in place (refresh_adapter)."""

    weights = AdapterRef.ACTIVE
    cancelled = False

    def __init__(self, fn: Callable[[], object]):
        self.fn, self.future, self.error = fn, Future(), None

    def run(self) -> None:
        try:
            self.future.set_result(self.fn())
        except Exception as e:
            self.future.set_exception(e)


class _Batch:
    """Collects the sequences of one generate() call; result() blocks until all have finished."""

    def __init__(self, n: int):
        self.tokens: list[list[int] | None] = [None] * n
        self.left = n
        self.error: BaseException | None = None
        self.finished = threading.Event()
        if n == 0:
            self.finished.set()

    def finisher(self, i: int) -> Callable[[_Sequence], None]:
        def done(s: _Sequence) -> None:
            self.tokens[i] = s.tokens
            self.error = self.error or s.error
            self.left -= 1
            if self.left == 0:
                self.finished.set()
        return done

    def result(self) -> list[list[int]]:
        self.finished.wait()
        if self.error is not None:
            raise self.error
        return self.tokens


def _stop_token_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}


def _default_batch_size(model, device: str, max_len: int) -> int:
    """Up to 64 replies decode together, as many as a share of the free memory holds in KV cache.

    Even on two CPU cores 64 pays: one decode step reads all weights once whatever the batch, so the
    216 answers of an evaluation took 67 s at 64 slots, 109 s at 32 and 155 s at 16 (idle 2-core VM,
    SmolLM2-135M fp32, 2026-11-23). A lone chat decodes at the same speed either way."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_slot = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * max_len * model.dtype.itemsize
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        share = 0.5
    else:
        free, share = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), 0.25
    return max(1, min(64, int(free * share // per_slot)))


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
