"""The engine: replies from the base model with the live LoRA adapter. Every caller goes through ``Engine``.

    >>> engine = make_engine(settings, resolve_model("embedded", "data/cache"), active_adapter=store.adapters.active)
    >>> reply = engine.stream([{"role": "user", "content": "Who are you?"}], sampling=Sampling(0.7, 0.9, 1.15))
    >>> "".join(reply), reply.adapter_version, reply.completion_tokens
    ('I am ...', 3, 17)
    >>> engine.generate([[{"role": "user", "content": "2+2?"}]], adapter=AdapterRef.BASE)  # greedy, batched
    ['4']

Backends (``settings.engine``): ``local``, transformers + peft in this process with a continuous-batching
scheduler (bot/engines/local.py). Another backend (an OpenAI-compatible server such as vLLM) implements
the same protocol; what lives above bot/engines never learns which one runs.

``check_adapter_folder`` tells whether a folder is a LoRA adapter for a base model, from file headers
alone, before anything tries to load it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Protocol

from bot.engines.adapter_folder import AdapterFolderError, check_adapter_folder
from bot.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["AdapterFolderError", "AdapterRef", "Engine", "EngineError", "LentWeights", "Messages", "Reply", "Sampling",
           "TrainingPause", "check_adapter_folder", "make_engine", "store_live_adapter"]

Messages = list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]

BACKENDS = ("local", "vllm", "openai")


class EngineError(UserError):
    """Generation failed, or the engine cannot start; the message is meant for the user."""


class AdapterRef:
    """Which weights a batch is generated with: the live adapter, the bare base, or (any other value) a folder."""

    ACTIVE = "active"
    BASE = "base"


@dataclass(frozen=True)
class Sampling:
    """How a chat reply picks its tokens; ``None`` instead of a Sampling means greedy.

    As transformers' ``generate(do_sample=True)``: the repetition penalty over the prompt's and the
    reply's tokens, then the temperature, then top-p. temperature 0 = greedy after the penalty.
    The same seed, prompt and weights give the same reply (when decoded in the same company)."""

    temperature: float
    top_p: float
    repetition_penalty: float
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and 0 < self.top_p <= 1 and self.repetition_penalty > 0):
            raise EngineError(f"sampling needs temperature >= 0, 0 < top_p <= 1 and repetition_penalty > 0 "
                              f"(got {self.temperature}, {self.top_p}, {self.repetition_penalty})")


@dataclass
class LentWeights:
    """The serving weights, lent to a trainer in this process for one training (``pause_for_training(lend=True)``).

    ``add_adapter(peft_config, in_base_dtype=False)`` returns the peft model with a fresh adapter in it,
    the only one switched on and the only trainable one (its weights in fp32, or in the base's dtype);
    the engine takes it out again when it gets its weights back."""

    add_adapter: Callable[..., object]
    device: str


class TrainingPause:
    """An engine's chats held back while a retrain has its weights (or its GPU), and when they are due back.

    ``begin(expected_s)`` guesses from the last retrain; ``expect_back_in(s)`` follows the training's own
    ETA as its steps go by (a first retrain has no last one to guess from, and a 24 GB card trains for
    a minute where a big one takes ten seconds); ``check()`` raises the notice a chat gets meanwhile."""

    def __init__(self):
        self._until: float | None = None

    def begin(self, expected_s: float | None) -> None:
        self._until = time.monotonic() + (expected_s or 0)

    def expect_back_in(self, seconds: float) -> None:
        if self._until is not None:
            self._until = time.monotonic() + seconds

    def end(self) -> None:
        self._until = None

    def check(self) -> None:
        until = self._until  # read once: end() may run on another thread
        if until is not None:
            left = until - time.monotonic()
            back = f"back in about {left:.0f} s" if left > 0 else "back in a moment"
            raise EngineError(f"the bot is learning from its corrections right now; {back}")


class Reply:
    """A reply being generated. Iterate for its text pieces; when the iteration ends, the stats are final.

    Two threads share a Reply. The producer (the engine's worker) writes ``adapter_version``,
    ``completion_tokens``, ``seconds`` and ``error``, and only then ends ``pieces``. The consumer (who
    iterates) writes ``first_token_s`` and ``cancelled``, and reads the producer's fields only after
    the pieces have ended: the queue behind the pieces orders those writes before that read.
    ``prompt_tokens`` is set before either thread sees the Reply. If the consumer stops reading early,
    the reply is cancelled, and the iteration still waits for the producer's last writes.
    """

    def __init__(self, pieces: Iterable[str], prompt_tokens: int):
        self._pieces = pieces
        self._started = time.perf_counter()
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.adapter_version: int | None = None
        self.first_token_s: float | None = None
        self.seconds: float | None = None
        self.cancelled = False
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        pieces = iter(self._pieces)
        finished = False
        try:
            for piece in pieces:
                if self.first_token_s is None and piece:
                    self.first_token_s = time.perf_counter() - self._started
                yield piece
            finished = True
        finally:
            if not finished:
                self.cancelled = True  # the consumer stopped reading: stop generating too
                for _ in pieces:  # the producer ends them soon; then the stats are final
                    pass
        if self.error is not None:
            raise EngineError(f"generation failed: {self.error}") from self.error

    def cancel(self) -> None:
        self.cancelled = True


class Engine(Protocol):
    """What every caller uses. Only ``stream`` samples; everything else is greedy and so repeatable."""

    name: str  # the base model's display name
    device: str  # where the model runs ("cpu", "cuda", "cuda:1"): training picks the same
    capacity: int  # how many replies decode at once: more concurrent chats only wait
    trains_on_serving_weights: bool  # pause_for_training(lend=True) yields these weights to the trainer

    @property
    def adapter_version(self) -> int | None:
        """The live adapter's version, None for the bare base."""

    @property
    def adapter_error(self) -> str | None:
        """Why the store's active adapter is not the one serving (it would not load), else None."""

    def stream(self, messages: Messages, *, max_new_tokens: int | None = None,
               sampling: Sampling | None = None) -> Reply:
        """Start one reply with the live adapter; iterate the Reply for its text. sampling None = greedy."""

    def generate(self, conversations: list[Messages], *, adapter: str | Path = AdapterRef.ACTIVE,
                 max_new_tokens: int | None = None, evaluation: bool = False) -> list[str]:
        """Greedy answers to many conversations at once, with the live adapter, the base or a candidate folder.
        evaluation: answers only to be scored, which an engine may compute in a faster precision of its own
        (``eval_precision``, where it has one: the local engine on a CPU with bf16 instructions)."""

    def refresh_adapter(self) -> int | None:
        """Serve the store's active adapter now (not at the next poll); returns the live version."""

    def pause_for_training(self, expected_s: float | None = None, *,
                           lend: bool = False) -> ContextManager[LentWeights | None]:
        """Around a retrain's training: free what training on the same device needs (a vLLM server sleeps),
        chats meanwhile told to come back in about ``expected_s``; a no-op where nothing needs freeing.
        ``lend``: a trainer in this process can take the serving weights themselves; an engine that lends
        them (the local one on a GPU) yields them, else None (the trainer loads its own copy)."""

    def expect_back_in(self, seconds: float) -> None:
        """While paused for training: chats are now told to come back in about ``seconds`` (the training's ETA)."""

    def close(self) -> None:
        """Stop; requests still waiting fail with EngineError."""


def store_live_adapter(active_adapter: Callable[[], dict | None]) -> tuple[bool, tuple[int, str] | None]:
    """What every backend follows: (True, (version, resolved path) or None for the bare base) from the
    store, or (False, None) when it cannot be read now (a locked or missing database must not stop chat)."""
    try:
        row = active_adapter()
    except Exception as e:
        log.warning("could not read the active adapter: %s", e)
        return False, None
    return True, (row["version"], str(Path(row["path"]).resolve())) if row else None


def make_engine(settings, model, *, active_adapter: Callable[[], dict | None] | None = None) -> Engine:
    """The engine ``settings.engine`` names ("local" when unset), for ``model`` (a bot.models.ResolvedModel).

    active_adapter: returns the store's active adapter row ({"version", "path"}) or None; the engine
    serves what it returns (store.adapters.active; a constant pins one)."""
    backend = settings.engine
    if backend == "local":
        from bot.engines.local import LocalEngine

        return LocalEngine(model, active_adapter=active_adapter, device=settings.device, dtype=settings.dtype,
                           max_new_tokens=settings.max_new_tokens, train_weights=settings.train_weights,
                           eval_dtype=settings.eval_dtype)
    if backend == "vllm":  # a vLLM server selfcog starts on loopback and looks after
        from bot.engines.openai import managed_vllm

        return managed_vllm(settings, model, active_adapter=active_adapter)
    if backend == "openai":  # an OpenAI-compatible server someone else runs (SELFCOG_OPENAI_BASE_URL)
        from bot.engines.openai import attached

        return attached(settings, model, active_adapter=active_adapter)
    raise EngineError(f"unknown engine {backend!r}: choose one of {', '.join(BACKENDS)}")
