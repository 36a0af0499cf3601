"""The in-process engine: transformers + peft, and a continuous-batching scheduler on one worker thread.

    >>> engine = LocalEngine(resolve_model("embedded", "data/cache"), active_adapter=store.adapters.active)
    >>> "".join(engine.stream([{"role": "user", "content": "Who are you?"}]))   # see bot/engines for the protocol

All model work happens on the worker thread, which runs the scheduler:

- Every request (a streamed chat reply, or each conversation of a ``generate`` batch) becomes a
  ``_Sequence`` and waits in one first-come-first-served line.
- Each step the worker admits waiting sequences into free cache slots (prefilling their prompts
  together, padded, in one forward, which gives each its first token); on a CPU only while the cache
  they may grow to (each one's prompt and max_new_tokens) fits its budget, so 256 short answers of an
  evaluation decode together and a few long chats take the same memory. Then it decodes one more token
  for *all* running sequences in a single batched forward (bot/engines/decoder.py), and picks each
  one's next token by its own settings (bot/engines/sampler.py). A new chat joins at the next step
  boundary instead of waiting for the replies already running to finish.
- All sequences in a step share one set of weights (bot/engines/weights.py): LIVE, BASE or a
  candidate folder, and one precision: an evaluation's (``generate(evaluation=True)``) may compute its
  matrix products in bf16 where chats are served in fp32 (``eval_precision``). A request for other
  weights or another precision waits until the running ones drain, then the weights change and its
  group runs; requests behind it wait for it (first come, first served, so neither chat nor evaluation
  can starve the other).
- While LIVE is in place the store's active adapter (``active_adapter()``) is read every ``poll_s``
  seconds, busy or idle, before admitting into an idle engine, and at once on ``refresh_adapter()``.
  A new adapter is swapped in at a step boundary without reloading the base. Replies running at that
  moment finish on the new weights; ``Reply.adapter_version`` is the version their prompt was read with.

- A retrain in this process may borrow the weights (``pause_for_training(lend=True)``, on a GPU): the
  running replies finish, nothing new is admitted, the worker waits inside a control while the trainer
  has the weights, and new requests are told "learning ... back in about N s" until they come back.

Threads: a caller's thread only tokenizes its prompt and puts the request in the inbox. Everything
else (the waiting line, the controls, the slots, the weights, each sequence once submitted) belongs to
the worker. ``adapter_version`` and ``adapter_error`` are read from any thread and may lag one step.

Greedy decoding is deterministic, and ``stream`` and ``generate`` run the same code path, so a
conversation gets the same answer through either when it is decoded in the same company. In other
company it can differ: a batched step's floating-point sums depend on the batch size in their last
bits, and a near-tie between two tokens can go the other way (rare in fp32 on the CPU; frequent in
bf16 on random weights; bench/NOTES.md).
"""

from __future__ import annotations

import os

# OpenMP's threads wait for the next parallel region by spinning ~0.1 ms, then sleep (libgomp counts ~100,000
# spins a millisecond; while the process holds more OpenMP threads than cores, e.g. the engine's beside the
# in-process trainer's, it spins 1,000 times, so the worker thread gives its team back whenever it is idle).
# Sleeping at once (OMP_WAIT_POLICY=PASSIVE, the setting before) woke the other thread for each of the
# ~15,000 small operators of a CPU training step: 7 steps took 13.4 s against 10.0 s (finetune/RECIPES.md,
# "Spinning briefly"). libgomp's own default (~3 ms of spinning) made matrix products 10-40x slower while a
# trainer process shared the cores (bench/NOTES.md). Either variable set by the user wins. Must be set
# before torch loads its OpenMP runtime.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ.update(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="10000")

from bot.hardware import (apply_gpu_memory_cap, cpu_has_fast_bf16, give_back_freed_memory,  # noqa: E402
                          gpu_free_bytes, keep_freed_memory, one_malloc_arena, release_openmp_threads)

# One malloc arena for the threads to come (the engine's worker, the retrain runner, the front ends), so
# that on a CPU the memory a retrain frees is there for the evaluation and the next retrain (see
# keep_freed_memory, which the engine turns on when it computes on the CPU). Before any other thread starts.
one_malloc_arena()

import contextlib  # noqa: E402
import logging  # noqa: E402
import queue  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bot.engines import (AdapterRef, EngineError, LentWeights, Messages, Reply, Sampling, TrainingPause,  # noqa: E402
                         store_live_adapter)

from bot.engines.decoder import (HFDecoder, LlamaDecoder, has_fast_decoder, kv_bytes_per_position,  # noqa: E402
                                 make_decoder)
from bot.engines.sampler import generator_for, pick_tokens  # noqa: E402
from bot.engines.weights import LIVE, AdapterWeights, Weights, weights_for  # noqa: E402
from bot.models import ModelNotFound, ResolvedModel  # noqa: E402

log = logging.getLogger(__name__)


# bf16 serving on a CPU with bf16 instructions decodes faster, but the base's bf16 answers become the replay
# rows, and a retrain on them was refused for lost facts (12/15 against the base's 15, dataset seed 2;
# RECIPES.md, "In-process training"). Off until the gate passes 9 of 10 seeds that way; SELFCOG_DTYPE=bf16 asks.
# Evaluations compute in bf16 there all the same (eval_precision): their answers are only scored.
BF16_ON_CPUS_THAT_HAVE_IT = False
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class LocalEngine:
    """transformers + peft in this process, with a continuous-batching scheduler. See the module docstring."""

    def __init__(self, model: ResolvedModel, *, active_adapter: Callable[[], dict | None] | None = None,
                 device: str = "auto", dtype: str = "auto", max_new_tokens: int = 256,
                 max_context_tokens: int = 2048, poll_s: float = 1.0, merge: bool = True,
                 batch_size: int | None = None, cuda_graphs: bool = True, train_weights: str = "auto",
                 eval_dtype: str = "auto"):
        """batch_size: how many replies decode together (cache slots); None = as memory allows (_default_batch_size).
        merge=False keeps LoRA unmerged (transformers' own forward, one reply at a time: slow, for debugging).
        dtype "auto": bf16 on a GPU, fp32 on a CPU (see BF16_ON_CPUS_THAT_HAVE_IT).
        eval_dtype: what ``generate(evaluation=True)`` computes in; "auto": see _choose_eval_precision.
        train_weights: "serving" lends these weights to an in-process trainer (pause_for_training), "copy"
        never does, "auto" = serving on a GPU (no second copy of a 7B model; chats wait a few seconds)."""
        if not log.isEnabledFor(logging.INFO):
            transformers.utils.logging.disable_progress_bar()  # keep `selfcog ask --json` output clean
        self.name = model.name
        self.max_new_tokens = max_new_tokens
        self.poll_s = poll_s
        self._active_adapter = active_adapter
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if dtype == "auto":
            dtype = "bf16" if self.device.startswith("cuda") or (BF16_ON_CPUS_THAT_HAVE_IT and cpu_has_fast_bf16()) else "fp32"
        torch_dtype = DTYPES[dtype]
        self.precision = dtype  # part of the key of every cached answer: bf16 and fp32 answers differ a little
        if train_weights not in ("auto", "serving", "copy"):
            raise EngineError(f"SELFCOG_TRAIN_WEIGHTS must be auto, serving or copy, not {train_weights!r}")
        self.trains_on_serving_weights = train_weights == "serving" or (
            train_weights == "auto" and self.device.startswith("cuda"))
        self._pause = TrainingPause()  # while a trainer has the weights
        apply_gpu_memory_cap(self.device)
        if self.device == "cpu":
            keep_freed_memory()
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
        # On a CPU the fast decoder's cache grows as replies need it, within a budget it checks before each
        # reply is admitted: many short replies (an evaluation) or a few long ones take the same memory.
        kv_budget = (kv_cache_budget() if merge and not self.device.startswith("cuda")
                     and has_fast_decoder(self.base.config, self.max_context_tokens) else None)
        self.capacity = batch_size or (CPU_MOST_SLOTS if kv_budget else
                                       _default_batch_size(self.base, self.device, self.max_context_tokens))
        if merge:
            self._decoder = make_decoder(self.base, capacity=self.capacity, max_len=self.max_context_tokens,
                                         cuda_graphs=cuda_graphs, kv_budget=kv_budget)
        else:
            self._decoder = HFDecoder(self.base, capacity=self.capacity, max_len=self.max_context_tokens)
        self.eval_precision = self._choose_eval_precision(eval_dtype)
        self._dtypes = {False: torch_dtype, True: DTYPES[self.eval_precision]}  # by generate's `evaluation`
        log.info("loaded %s on %s (%s, evaluating in %s, %s, %d slots) in %.1f s", self.name, self.device, dtype,
                 self.eval_precision, type(self._decoder).__name__, self.capacity, time.perf_counter() - started)

        self._weights = AdapterWeights(self.base, model.path, merge=merge, on_change=self._decoder.weights_changed)
        # From any thread: requests (a list of sequences), controls, and None (= stop). The rest is the worker's.
        self._inbox: queue.Queue[list[_Sequence] | _Control | None] = queue.Queue()
        self._inbox_lock = threading.Lock()  # nothing enters the inbox after the stop marker
        self._closed = False
        self._waiting: deque[_Sequence] = deque()  # first come, first served
        self._controls: deque[_Control] = deque()  # run at the next step boundary with LIVE in place
        self._running: list[_Sequence] = []  # index == cache slot
        self._last_poll = 0.0
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._worker.start()
        self.refresh_adapter()

    def _choose_eval_precision(self, asked: str) -> str:
        """The precision evaluations compute their matrix products in. "auto": bf16 where this engine serves in
        fp32 on a CPU with bf16 instructions (a retrain's 260 answers in 21-24 s against 33-42 s, 2-core AMD
        EPYC; the gate decided alike on 9 of 10 adapters, and a retrain checks a near refusal as served:
        finetune/RECIPES.md "Evaluating in bf16"), if a bf16 copy of the weights fits in what the KV cache may
        take; else the serving precision. Chats are always served as loaded."""
        decoder = self._decoder
        can = isinstance(decoder, LlamaDecoder) and decoder.graphs is None  # products from cast copies of the weights
        if asked == "auto":
            copy_bytes = sum(p.numel() for p in self.base.parameters()) * 2
            fits = decoder.kv_budget is not None and copy_bytes <= decoder.kv_budget
            return "bf16" if can and fits and self.precision == "fp32" and cpu_has_fast_bf16() else self.precision
        if asked not in DTYPES:
            raise EngineError(f"SELFCOG_EVAL_DTYPE must be auto, bf16, fp16 or fp32, not {asked!r}")
        if asked != self.precision and not can:
            raise EngineError(f"SELFCOG_EVAL_DTYPE={asked}: this engine ({type(decoder).__name__} on {self.device}) "
                              f"evaluates in the precision it serves in, {self.precision}; unset it")
        return asked

    # --- the Engine protocol ----------------------------------------------------------------------
    @property
    def adapter_version(self) -> int | None:
        live = self._weights.live
        return live[0] if live else None

    @property
    def adapter_error(self) -> str | None:
        return self._weights.error

    def stream(self, messages: Messages, *, max_new_tokens: int | None = None,
               sampling: Sampling | None = None) -> Reply:
        """Start generating a reply with the live adapter; iterate the returned Reply for its text as it arrives."""
        self._pause.check()
        max_new_tokens = max_new_tokens or self.max_new_tokens
        prompt = self.encode(self.fit_to_context(messages, max_new_tokens))
        pieces: queue.Queue[str | None] = queue.Queue()
        reply = Reply(iter(pieces.get, None), prompt_tokens=len(prompt))
        self._put([_Sequence(prompt, max_new_tokens, LIVE, self._dtypes[False], sampling=sampling,
                             device=self.device, reply=reply, pieces=pieces)])
        return reply

    def generate(self, conversations: list[Messages], *, adapter: str | Path = AdapterRef.ACTIVE,
                 max_new_tokens: int | None = None, evaluation: bool = False) -> list[str]:
        """Greedy answers to many conversations at once; adapter picks live / base / a candidate folder;
        evaluation: computed in ``eval_precision`` (answers to be scored, not shown to anyone)."""
        return self.submit(conversations, adapter=adapter, max_new_tokens=max_new_tokens,
                           evaluation=evaluation).result()

    def submit(self, conversations: list[Messages], *, adapter: str | Path = AdapterRef.ACTIVE,
               max_new_tokens: int | None = None, evaluation: bool = False) -> Future[list[str]]:
        """``generate`` without waiting: the Future gets the answers. Served in the order submitted."""
        self._pause.check()
        max_new_tokens = max_new_tokens or self.max_new_tokens
        weights = weights_for(adapter)
        prompts = [self.encode(self.fit_to_context(c, max_new_tokens)) for c in conversations]
        batch = _Batch(len(prompts), self._text)
        # All at once, so they are admitted together, and in an order that prefills well: prompts with one
        # system prompt and history side by side (their shared start is computed once, see decoder.py) and
        # of about one length (a forward is padded to its longest). An evaluation's 260 prompts in the order
        # asked were padded by 26%.
        order = sorted(range(len(prompts)), key=lambda i: (_history(conversations[i]), len(prompts[i])))
        dtype = self._dtypes[evaluation]
        self._put([_Sequence(prompts[i], max_new_tokens, weights, dtype, on_done=batch.finisher(i)) for i in order])
        return batch.future

    @contextlib.contextmanager
    def pause_for_training(self, expected_s: float | None = None, *, lend: bool = False):
        """Around a retrain's training. With ``lend`` and ``trains_on_serving_weights`` (a GPU, or asked
        for): the replies running finish, then the trainer gets these very weights (finetune/in_process.py)
        and new chats are told "learning ... back in about N s" until it gives them back with the live
        adapter in place again. Otherwise training takes its own copy and chats go on: yields None."""
        if not (lend and self.trains_on_serving_weights):
            yield None
            return
        lent, returned = threading.Event(), threading.Event()

        def hold() -> None:  # on the worker thread, nothing running: it waits here while the trainer works
            clock = time.perf_counter()
            self._weights.lend()
            log.info("weights lent in %.2f s", time.perf_counter() - clock)
            lent.set()
            returned.wait()
            clock = time.perf_counter()
            self._weights.take_back()
            log.info("weights taken back, the live adapter in place, in %.2f s", time.perf_counter() - clock)

        control = _Control(hold, when_idle=True)
        self._pause.begin(expected_s)
        try:
            self._put(control)
            while not lent.wait(0.05):
                if control.future.done():
                    control.future.result()  # lend() failed: raise it here
            log.info("serving paused: the trainer has the weights")
            yield LentWeights(add_adapter=self._weights.add_training_adapter, device=self.device)
        finally:
            returned.set()
            if lent.is_set():
                control.future.result()  # the live adapter is back in place
            self._pause.end()
            log.info("serving again")

    def expect_back_in(self, seconds: float) -> None:
        self._pause.expect_back_in(seconds)

    def refresh_adapter(self) -> int | None:
        """Serve the store's active adapter now (instead of at the next poll) and return the live version."""
        control = _Control(self._sync_live)
        self._put(control)
        control.future.result()
        return self.adapter_version

    def close(self) -> None:
        with self._inbox_lock:
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

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _put(self, item: list[_Sequence] | _Control) -> None:
        with self._inbox_lock:
            if self._closed:
                raise EngineError("the engine is shut down")
            self._inbox.put(item)

    # --- the scheduler (worker thread) ------------------------------------------------------------
    def _work(self) -> None:
        """One loop turn = one step boundary: take requests, maybe change weights, admit, decode a token."""
        while not self._stopping:
            try:
                idle = not (self._running or self._waiting or self._controls)
                if idle and self.device == "cpu":  # an idle team beside a trainer's slows its every step
                    release_openmp_threads()  # (bot/hardware.py); nothing to do when none is left
                self._collect(wait=idle)
                if not self._running:
                    self._start_next_group()
                if self._weights.serving == LIVE:
                    while self._controls and not (self._controls[0].when_idle and self._running):
                        self._controls.popleft().run()
                    if time.monotonic() - self._last_poll >= self.poll_s:
                        self._sync_live()
                self._admit()
                if self._running:
                    self._step()
            except Exception as e:  # the worker must survive anything: fail what was running, go on
                log.exception("engine worker step failed")
                for slot, s in enumerate(self._running):
                    s.error = s.error or e
                    self._finish(s)
                    self._decoder.release(slot)
                self._running = []
        self._shut_down()

    def _collect(self, wait: bool) -> None:
        """Move new requests and controls from the inbox to their lines (waiting up to poll_s when idle)."""
        try:
            item = self._inbox.get(timeout=self.poll_s) if wait else self._inbox.get_nowait()
            while True:
                if item is None:
                    self._stopping = True
                elif isinstance(item, _Control):
                    self._controls.append(item)
                else:
                    self._waiting.extend(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _start_next_group(self) -> None:
        """Nothing is running: put in place the weights and the precision the next group needs (LIVE as
        served when idle or a control waits)."""
        while self._waiting and self._waiting[0].cancelled:
            self._finish(self._waiting.popleft())
        first = self._waiting[0] if self._waiting and not self._controls else None
        wanted = first.weights if first else LIVE
        self._decoder.compute_in(first.dtype if first else self._dtypes[False])  # an evaluation's, or back
        try:
            self._weights.use(wanted)
        except Exception as e:  # e.g. a candidate folder that will not load: the weights are as they were
            log.warning("could not use adapter %s: %s", wanted, e)
            failed = [s for s in self._waiting if s.weights == wanted]
            self._waiting = deque(s for s in self._waiting if s.weights != wanted)
            for s in failed:
                s.error = e
                self._finish(s)
            while wanted == LIVE and self._controls:
                self._controls.popleft().future.set_exception(e)
            return
        if wanted == LIVE and self._waiting:
            self._sync_live()  # look at the store before serving after an idle spell

    def _sync_live(self) -> None:
        """Serve what the store says is active (LIVE in place; a bad folder keeps the current one, see weights)."""
        self._last_poll = time.monotonic()
        if self._active_adapter is None:
            return
        read, wanted = store_live_adapter(self._active_adapter)
        if read:
            self._weights.follow(wanted)

    def _admit(self) -> None:
        """Prefill the waiting requests the weights in place answer into free slots: oldest first, in one call."""
        if any(c.when_idle for c in self._controls):
            self._retire_finished()  # the running replies drain; then the control runs
            return
        admitted: list[_Sequence] = []
        longest = max((self._longest(x) for x in self._running), default=0)
        while (self._waiting and self._weights.computes(self._waiting[0].weights)
               and self._waiting[0].dtype == self._decoder.matmul_dtype):
            s = self._waiting[0]
            rows, longest_with_s = len(self._running) + len(admitted) + 1, max(longest, self._longest(s))
            if rows > self.capacity or (rows > 1 and not self._decoder.fits(rows, longest_with_s)):
                break  # it waits for replies to finish; a reply alone always runs
            longest = longest_with_s
            self._waiting.popleft()
            if s.cancelled:
                self._finish(s)
            else:
                admitted.append(s)
        self._prefill(admitted)
        self._retire_finished()

    def _longest(self, s: _Sequence) -> int:
        """The most cache positions a reply can need: its prompt and every token it may generate."""
        return min(len(s.prompt) + s.max_new_tokens, self.max_context_tokens)

    def _prefill(self, group: list[_Sequence]) -> None:
        """Put a group of new sequences in the next free slots; their prompts' forward gives their first tokens."""
        if not group:
            return
        first_slot = len(self._running)
        for s in group:
            if s.reply is not None:
                s.reply.adapter_version = self.adapter_version  # stream() replies always use LIVE
            self._running.append(s)
        try:
            # room for all of them at their longest now, rather than growing the cache as they go
            self._decoder.reserve(len(self._running), max(map(self._longest, self._running)))
            logits = self._decoder.prefill(list(range(first_slot, first_slot + len(group))), [s.prompt for s in group])
            for s, token in zip(group, self._pick(logits, group)):
                s.cache_len = len(s.prompt)
                self._accept(s, token)
        except Exception as e:
            log.exception("prefill failed")
            for s in group:
                s.error = e

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
        seen = [s.prompt + s.tokens if s.sampling else [] for s in seqs]  # what the repetition penalty looks at
        return pick_tokens(logits, [s.sampling for s in seqs], seen, [s.generator for s in seqs])

    def _accept(self, s: _Sequence, token: int) -> None:
        """Record a sequence's new token; stream its text; mark it finished at a stop token or a limit."""
        s.generated += 1
        if token in self._stop_ids:
            s.done = True
            return
        s.tokens.append(token)
        if s.pieces is not None:
            self._send_new_text(s)
        if s.generated >= s.max_new_tokens or s.cache_len + 1 >= self.max_context_tokens:
            s.done = True

    def _send_new_text(self, s: _Sequence, *, final: bool = False) -> None:
        """Stream the text the newest tokens complete, decoding only the tokens since the last piece sent
        (and the ones of that piece, for context) instead of the whole reply at every step, as vLLM does."""
        sent = self._text(s.tokens[s.prefix_offset:s.read_offset])
        text = self._text(s.tokens[s.prefix_offset:])
        # hold back a half-decoded character, and text the tokenizer may still rewrite
        if len(text) > len(sent) and text.startswith(sent) and (final or not text.endswith("\ufffd")):
            s.pieces.put(text[len(sent):])
            s.prefix_offset, s.read_offset = s.read_offset, len(s.tokens)

    def _retire_finished(self) -> None:
        """Finish done, cancelled and failed sequences; keep the running ones packed in slots 0..n-1."""
        finished, i = [], 0
        while i < len(self._running):
            s = self._running[i]
            if not (s.done or s.cancelled or s.error):
                i += 1
                continue
            finished.append(s)
            last = self._running.pop()
            if last is s:
                self._decoder.release(i)
            else:  # the last sequence moves into the hole
                self._decoder.move(len(self._running), i, last.cache_len)
                self._running[i] = last
        if finished and not self._running and not self._waiting:
            # On a CPU, what the cache grew to goes back until the next reply, and with it the memory the
            # process kept meanwhile (an evaluation's cache and copies of the weights, a finished training's
            # tensors): the process keeps what it frees while it computes (keep_freed_memory), not while it
            # idles. Before the replies are handed over: a caller that then exits must find this thread
            # idle, not inside torch (an interpreter exiting under a running torch op aborts the process).
            evaluated_apart = self._decoder.matmul_dtype != self._dtypes[False]
            self._decoder.compute_in(self._dtypes[False])
            if (self._decoder.trim() or evaluated_apart) and self.device == "cpu":
                give_back_freed_memory()
        for s in finished:
            self._finish(s)

    def _finish(self, s: _Sequence) -> None:
        if s.pieces is not None:
            if not s.error:
                self._send_new_text(s, final=True)
            s.reply.completion_tokens = s.generated
            s.reply.error = s.error
            s.reply.seconds = time.perf_counter() - s.started
            s.pieces.put(None)  # after the stats: the consumer reads them once the pieces have ended
        if s.on_done is not None:
            s.on_done(s)

    def _shut_down(self) -> None:
        error = EngineError("the engine is shut down")
        for s in [*self._running, *self._waiting]:
            s.error = s.error or error
            self._finish(s)
        for control in self._controls:
            control.future.set_exception(error)
        self._running, self._waiting, self._controls = [], deque(), deque()


class _Sequence:
    """One reply being generated: what the scheduler tracks for each request."""

    def __init__(self, prompt: list[int], max_new_tokens: int, weights: Weights, dtype: torch.dtype, *,
                 sampling: Sampling | None = None, device: str = "cpu", reply: Reply | None = None,
                 pieces: queue.Queue | None = None, on_done: Callable[[_Sequence], None] | None = None):
        self.started = time.perf_counter()
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.weights = weights  # LIVE, BASE or a Candidate folder
        self.dtype = dtype  # what its steps compute in: the serving dtype, or the evaluation's
        self.sampling = sampling  # None: greedy
        self.generator = generator_for(sampling, device)  # its own random draws when the sampling has a seed
        self.reply, self.pieces = reply, pieces  # stream(): the consumer's Reply and its text queue
        self.on_done = on_done  # submit(): told when this sequence ends
        self.tokens: list[int] = []  # generated so far, stop token excluded
        self.generated = 0  # tokens produced, stop token included (as transformers counts them)
        self.cache_len = 0  # positions of this sequence held in its cache slot
        self.prefix_offset = self.read_offset = 0  # tokens[prefix:read] = those of the last text piece sent
        self.done = False
        self.error: BaseException | None = None

    @property
    def cancelled(self) -> bool:
        return self.reply is not None and self.reply.cancelled


class _Control:
    """A function the worker runs between steps with LIVE in place (refresh_adapter); its future gets the result.
    when_idle: only once no reply is running (lending the weights to a trainer); nothing new is admitted meanwhile."""

    def __init__(self, fn: Callable[[], object], *, when_idle: bool = False):
        self.fn, self.future, self.when_idle = fn, Future(), when_idle

    def run(self) -> None:
        try:
            self.future.set_result(self.fn())
        except Exception as e:
            self.future.set_exception(e)


class _Batch:
    """The sequences of one submit(): the future gets their texts when the last one ends, or the first error."""

    def __init__(self, n: int, text: Callable[[list[int]], str]):
        self.future: Future[list[str]] = Future()
        self.texts: list[str] = [""] * n
        self.left = n
        self.text = text
        if n == 0:
            self.future.set_result([])

    def finisher(self, i: int) -> Callable[[_Sequence], None]:
        def done(s: _Sequence) -> None:  # on the worker thread
            self.left -= 1
            if s.error is not None and not self.future.done():
                self.future.set_exception(s.error)
            elif s.error is None:
                self.texts[i] = self.text(s.tokens).strip()
            if self.left == 0 and not self.future.done():
                self.future.set_result(self.texts)
        return done


def _history(conversation: Messages) -> tuple[tuple[str, str], ...]:
    """What comes before the newest message: the system prompt and earlier turns."""
    return tuple((m["role"], m["content"]) for m in conversation[:-1])


def _stop_token_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}


def _default_batch_size(model, device: str, max_len: int) -> int:
    """On a GPU: as many replies decode together as a quarter of the free memory holds in full-length KV
    cache rows (CUDA graphs need the cache whole from the start), up to 256. On a CPU without the fast
    decoder (HFDecoder), the same rule up to 64; the fast decoder budgets its cache instead (CPU_MOST_SLOTS).

    More replies at once pay even on two CPU cores: one decode step reads all weights once whatever the
    batch, so the 216 answers of an evaluation took 67 s at 64 slots, 109 s at 32 and 155 s at 16 (idle
    2-core VM, SmolLM2-135M fp32, 2026-11-23). On a GPU a retrain's evaluation (260 answers of a 7B model)
    took 4.1-4.7 s at 64 slots, 3.0-3.3 s at 128 and 2.7-2.8 s at 256 (H200, 2026-11-30; bench/gpu_decode.py
    --eval-slots); 256 slots of a 7B model's cache are 30 GB. A lone chat decodes at the same speed either
    way. The other three quarters stay free for training on these weights."""
    per_slot = kv_bytes_per_position(model.config, model.dtype) * max_len
    budget, most = (gpu_free_bytes(device) // 4, 256) if device.startswith("cuda") else (kv_cache_budget(), 64)
    return max(1, min(most, budget // per_slot))


# On a CPU the fast decoder admits up to this many replies at once, as many as its KV budget holds at
# their longest: the 260 answers of an evaluation took 61-63 s at 256 against 82-87 s at 64 (2-core AMD
# EPYC, SmolLM2-135M fp32, 2026-11-30; bench/cpu_decode.py --eval-slots), in 3.5 GB of cache.
CPU_MOST_SLOTS = 256


def kv_cache_budget() -> int:
    """The bytes a CPU's KV cache may take: a quarter of the memory free at start (the rest is the
    weights, a trainer's copy of them, and the machine's other work)."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
