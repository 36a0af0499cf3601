"""The chat service: the one API the web page, the Telegram bot and the CLI talk through.

    >>> chat = ChatService(store, engine)
    >>> conversation = chat.conversation("web", chat_key="browser-session-1", user="alice")
    >>> turn = chat.send(conversation, "Who are you?")
    >>> for text_so_far in turn: print(text_so_far)      # the reply grows as it streams
    >>> chat.correct(turn.message_id, "I am Aurora, made by Acme Labs.", channel="web", submitter="alice")

Every reply is stored with the adapter version that produced it, its latency and token counts.
Questions about the bot itself are flagged as they arrive. A correction keeps the question, the
wrong answer and the fix together, pending until an admin reviews it.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import unicodedata
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar

from bot.engines import AdapterRef, Engine, EngineError, Sampling
from bot.errors import UserError
from bot.identity import is_identity_question, system_prompt
from store import Profile, Store, StoreError

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 8000  # ~2k tokens: the whole context window of the embedded default
MAX_CORRECTION_CHARS = 2000
SAVE_WITHIN_S = 60.0  # how long a chat write keeps retrying while another process holds the write lock
T = TypeVar("T")
PRODUCT_PROMPT = object()  # "the product's own system prompt, from the identity profile"


class ChatInputError(UserError):
    """The user's input cannot be used; the message says why and what to do instead."""


class SaveFailed(UserError):
    """The database stayed locked for SAVE_WITHIN_S: nothing was saved, so the front end keeps the text."""


def clean_text(text: object, *, what: str = "message", limit: int = MAX_MESSAGE_CHARS, empty_ok: bool = False) -> str:
    """Validate user text: not empty, not binary, not too long. Returns it stripped.

    NUL and other control characters (but newlines and tabs) are dropped, and a lone surrogate (half
    of an emoji from a broken client, or a "\\ud800" JSON escape) becomes U+FFFD, which SQLite can store."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ChatInputError(f"That {what} is binary data, not text. Please send plain text.") from None
    if not isinstance(text, str):
        raise ChatInputError(f"That {what} is not text. Please send plain text.")
    # UTF-16 round trip: joins surrogate pairs into their character, replaces lone ones with U+FFFD.
    text = text.replace("\x00", "").encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if sum(unicodedata.category(c) == "Cc" and c not in "\n\r\t" for c in text) > max(3, len(text) // 20):
        raise ChatInputError(f"That {what} looks like binary data, not text. Please send plain text.")
    text = "".join(c for c in text if unicodedata.category(c) != "Cc" or c in "\n\t").strip()
    if not text and not empty_ok:
        raise ChatInputError(f"The {what} is empty. Please type something.")
    if len(text) > limit:
        raise ChatInputError(f"The {what} is {len(text):,} characters long; the limit is {limit:,}. "
                             "Please shorten it or send it in parts.")
    return text


def save_retrying(write: Callable[[], T], *, within_s: float = SAVE_WITHIN_S) -> T:
    """Run a store write; while another process holds the database's write lock, wait and try again
    (each try already waits the store's busy timeout) for up to within_s, then raise SaveFailed."""
    deadline = time.monotonic() + within_s
    pause = 0.05
    while True:
        try:
            return write()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("gave up saving after %.0f s: %s", within_s, e)
                raise SaveFailed("Couldn't save — try again.") from None
            log.warning("database is locked; trying to save again (%.0f s left)", left)
            time.sleep(min(pause, left))
            pause = min(pause * 2, 2.0)


class Turn:
    """One exchange being answered. Iterate for the growing reply text; then message_id is set."""

    def __init__(self, service: "ChatService", conversation_id: int, user_message_id: int, identity_question: bool,
                 messages: list[dict], max_new_tokens: int | None, sampling: Sampling | None):
        self.conversation_id = conversation_id
        self.user_message_id = user_message_id
        self.identity_question = identity_question
        self.message_id: int | None = None
        self.text = ""
        self.adapter_version: int | None = None
        self._service = service
        self._messages = messages
        self._max_new_tokens = max_new_tokens
        self._sampling = sampling

    def __iter__(self) -> Iterator[str]:
        started = time.perf_counter()
        reply = self._service.engine.stream(self._messages, max_new_tokens=self._max_new_tokens,
                                            sampling=self._sampling)
        try:
            for piece in reply:
                self.text += piece
                yield self.text
        except EngineError as e:
            raise ChatInputError(f"The model failed to answer ({e}). Please try again.") from e
        finally:
            # Store what the user saw, also when they stopped reading half-way.
            self.text = self.text.strip()
            self.adapter_version = reply.adapter_version
            if self.text:
                stats = dict(adapter_version=reply.adapter_version,
                             latency_ms=round((time.perf_counter() - started) * 1000),
                             first_token_ms=round(reply.first_token_s * 1000) if reply.first_token_s else None,
                             prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
                self.message_id = self._service.save(lambda: self._service.store.conversations.add_message(
                    self.conversation_id, "assistant", self.text, **stats))

    def run(self) -> str:
        """Generate the whole reply without streaming; returns its text."""
        for _ in self:
            pass
        return self.text


class ChatService:
    def __init__(self, store: Store, engine: Engine, *, max_new_tokens: int | None = None,
                 sampling: Sampling | None = None, save_within_s: float = SAVE_WITHIN_S):
        """sampling: how chat replies pick their tokens (Settings.chat_*); None = greedy, as in the tests.
        save_within_s: how long a write keeps trying while the database is locked (then SaveFailed)."""
        self.store = store
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.save_within_s = save_within_s

    def save(self, write: Callable[[], T]) -> T:
        """A write from a front end: retried while the database is locked, SaveFailed if it stays locked."""
        return save_retrying(write, within_s=self.save_within_s)

    # --- identity ---------------------------------------------------------------------------------
    def profile(self) -> Profile:
        return self.store.identity.current()

    def system_prompt(self) -> str:
        return system_prompt(self.profile())

    def status(self) -> dict:
        """What a user or admin sees at a glance: who the bot is and which weights answer."""
        profile = self.profile()
        return {"name": profile.name, "author": profile.author, "model": self.engine.name,
                "adapter_version": self.engine.adapter_version,
                "adapter_error": self.engine.adapter_error}

    # --- conversations ----------------------------------------------------------------------------
    def conversation(self, channel: str, *, chat_key: str, user: str | int | None = None,
                     display_name: str | None = None, new: bool = False, create: bool = True) -> int | None:
        """The conversation held at chat_key (a browser session, a Telegram chat), started if needed.

        create=False only looks (a page showing its history on load): it writes nothing and returns
        None when this chat has no conversation yet. Call it with create=True when the user sends."""
        existing = None if new else self.store.conversations.latest(channel, chat_key)
        if not create:
            return existing

        def start() -> int:  # get_or_create writes only for a new user or a changed display name
            user_id = self.store.users.get_or_create(channel, user, display_name)["id"] if user is not None else None
            return existing or self.store.conversations.start(channel, chat_key, user_id)

        return self.save(start)

    def history(self, conversation_id: int) -> list[dict]:
        return self.store.conversations.messages(conversation_id)

    def send(self, conversation_id: int, text: object, *, max_new_tokens: int | None = None) -> Turn:
        """Store the user's message and return the Turn that streams and stores the answer."""
        text = clean_text(text)
        identity_question = is_identity_question(text)
        history = [{"role": m["role"], "content": m["text"]} for m in self.store.conversations.messages(conversation_id)]
        user_message_id = self.save(lambda: self.store.conversations.add_message(
            conversation_id, "user", text, identity_question=int(identity_question)))
        messages = [{"role": "system", "content": self.system_prompt()}, *history, {"role": "user", "content": text}]
        return Turn(self, conversation_id, user_message_id, identity_question, messages,
                    max_new_tokens or self.max_new_tokens, self.sampling)

    def answer(self, questions: list[str], *, system: object = PRODUCT_PROMPT, max_new_tokens: int | None = None, adapter: str | Path = AdapterRef.ACTIVE) -> list[str]:
        """Answer one-off questions in a batch, greedily (the same every time), not stored (the CLI's `ask`).

        system: PRODUCT_PROMPT (default), another prompt text, or None for no system message at all.
        adapter: AdapterRef.ACTIVE (default), AdapterRef.BASE, or a candidate adapter folder."""
        questions = [clean_text(q, what="question") for q in questions]
        prefix = [] if system is None else [
            {"role": "system", "content": self.system_prompt() if system is PRODUCT_PROMPT else str(system)}]
        return self.engine.generate([prefix + [{"role": "user", "content": q}] for q in questions], adapter=adapter,
                                    max_new_tokens=max_new_tokens or self.max_new_tokens)

    def compare(self, questions: list[str], weights: Mapping[str, str | Path], *,
                max_new_tokens: int | None = None) -> list[dict]:
        """The same questions answered by several weights, side by side (the admin's before/after table).

            >>> chat.compare(["Who are you?"], {"base": AdapterRef.BASE, "active": AdapterRef.ACTIVE, "candidate": path})
            [{'question': 'Who are you?', 'base': 'I am SmolLM...', 'active': ..., 'candidate': ...}]
        """
        questions = [clean_text(q, what="question") for q in questions]
        if not questions:
            raise ChatInputError("There are no questions to compare. Please enter at least one.")
        rows = [{"question": q} for q in questions]
        for label, adapter in weights.items():
            for row, text in zip(rows, self.answer(questions, adapter=adapter, max_new_tokens=max_new_tokens)):
                row[label] = text
        return rows

    # --- feedback and corrections -------------------------------------------------------------------
    def rate(self, message_id: int, rating: int, *, channel: str, user: str | int | None = None) -> dict:
        """👍 (+1) or 👎 (-1) on an answer; returns the message's totals."""
        def save_rating() -> None:
            user_id = self.store.users.get_or_create(channel, user)["id"] if user is not None else None
            self.store.conversations.rate(message_id, user_id, rating)

        try:
            self.save(save_rating)
        except StoreError as e:
            raise ChatInputError(str(e)) from None
        return self.store.conversations.ratings(message_id)

    def correct(self, message_id: int, corrected_answer: object, *, channel: str,
                submitter: str | None = None) -> tuple[int, bool]:
        """Record the right answer for one of the bot's answers. Returns (correction id, newly created)."""
        corrected_answer = clean_text(corrected_answer, what="correction", limit=MAX_CORRECTION_CHARS)
        try:
            message = self.store.conversations.message(message_id)
        except StoreError:
            raise ChatInputError("That message no longer exists, so it cannot be corrected.") from None
        if message["role"] != "assistant":
            raise ChatInputError("Only the bot's answers can be corrected, not your own messages.")
        question = self.store.conversations.question_before(message_id)
        if question is None:
            raise ChatInputError("That answer has no question before it, so there is nothing to correct.")
        return self.save(lambda: self.store.corrections.add(
            question=question["text"], wrong_answer=message["text"], corrected_answer=corrected_answer,
            channel=channel, submitter=str(submitter) if submitter is not None else None, message_id=message_id))

    def answer_in(self, message_id: int, *, channel: str, chat_key: str) -> dict:
        """One of the bot's answers, checked to be from this chat (a button press names it); ChatInputError if not."""
        try:
            message = self.store.conversations.message(message_id)
            conversation = self.store.conversations.get(message["conversation_id"])
        except StoreError:
            raise ChatInputError("That answer no longer exists.") from None
        if message["role"] != "assistant" or (conversation["channel"], conversation["chat_key"]) != (channel, chat_key):
            raise ChatInputError("That answer is not from this chat.")
        return message

    def last_answer(self, conversation_id: int) -> dict | None:
        answers = [m for m in self.store.conversations.messages(conversation_id) if m["role"] == "assistant"]
        return answers[-1] if answers else None
