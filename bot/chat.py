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
import time
import unicodedata
from pathlib import Path
from typing import Iterator, Mapping

from bot.engine import AdapterRef, Engine, EngineError
from bot.identity import is_identity_question, system_prompt
from store import Profile, Store, StoreError

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 8000  # ~2k tokens: the whole context window of the embedded default
MAX_CORRECTION_CHARS = 2000
PRODUCT_PROMPT = object()  # "the product's own system prompt, from the identity profile"


class ChatInputError(ValueError):
    """The user's input cannot be used; the message says why and what to do instead."""


def clean_text(text: object, *, what: str = "message", limit: int = MAX_MESSAGE_CHARS) -> str:
    """Validate user text: not empty, not binary, not too long. Returns it stripped."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ChatInputError(f"That {what} is binary data, not text. Please send plain text.") from None
    if not isinstance(text, str):
        raise ChatInputError(f"That {what} is not text. Please send plain text.")
    if "\x00" in text or sum(unicodedata.category(c) == "Cc" and c not in "\n\r\t" for c in text) > max(3, len(text) // 20):
        raise ChatInputError(f"That {what} looks like binary data, not text. Please send plain text.")
    text = "".join(c for c in text if unicodedata.category(c) != "Cc" or c in "\n\t").strip()
    if not text:
        raise ChatInputError(f"The {what} is empty. Please type something.")
    if len(text) > limit:
        raise ChatInputError(f"The {what} is {len(text):,} characters long; the limit is {limit:,}. "
                             "Please shorten it or send it in parts.")
    return text


class Turn:
    """One exchange being answered. Iterate for the growing reply text; then message_id is set."""

    def __init__(self, service: "ChatService", conversation_id: int, user_message_id: int, identity_question: bool,
                 messages: list[dict], max_new_tokens: int | None, temperature: float):
        self.conversation_id = conversation_id
        self.user_message_id = user_message_id
        self.identity_question = identity_question
        self.message_id: int | None = None
        self.text = ""
        self.adapter_version: int | None = None
        self._service = service
        self._messages = messages
        self._max_new_tokens = max_new_tokens
        self._temperature = temperature

    def __iter__(self) -> Iterator[str]:
        started = time.perf_counter()
        reply = self._service.engine.stream(self._messages, max_new_tokens=self._max_new_tokens,
                                            temperature=self._temperature)
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
                self.message_id = self._service.store.conversations.add_message(
                    self.conversation_id, "assistant", self.text,
                    adapter_version=reply.adapter_version,
                    latency_ms=round((time.perf_counter() - started) * 1000),
                    first_token_ms=round(reply.first_token_s * 1000) if reply.first_token_s else None,
                    prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)

    def run(self) -> str:
        """Generate the whole reply without streaming; returns its text."""
        for _ in self:
            pass
        return self.text


class ChatService:
    def __init__(self, store: Store, engine: Engine, *, max_new_tokens: int | None = None):
        self.store = store
        self.engine = engine
        self.max_new_tokens = max_new_tokens

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
                "adapter_error": getattr(self.engine, "adapter_error", None)}

    # --- conversations ----------------------------------------------------------------------------
    def conversation(self, channel: str, *, chat_key: str, user: str | int | None = None,
                     display_name: str | None = None, new: bool = False) -> int:
        """The conversation held at chat_key (a browser session, a Telegram chat), started if needed."""
        user_id = self.store.users.get_or_create(channel, user, display_name)["id"] if user is not None else None
        existing = None if new else self.store.conversations.latest(channel, chat_key)
        return existing or self.store.conversations.start(channel, chat_key, user_id)

    def history(self, conversation_id: int) -> list[dict]:
        return self.store.conversations.messages(conversation_id)

    def send(self, conversation_id: int, text: object, *, max_new_tokens: int | None = None,
             temperature: float = 0.0) -> Turn:
        """Store the user's message and return the Turn that streams and stores the answer."""
        text = clean_text(text)
        identity_question = is_identity_question(text)
        history = [{"role": m["role"], "content": m["text"]} for m in self.store.conversations.messages(conversation_id)]
        user_message_id = self.store.conversations.add_message(
            conversation_id, "user", text, identity_question=int(identity_question))
        messages = [{"role": "system", "content": self.system_prompt()}, *history, {"role": "user", "content": text}]
        return Turn(self, conversation_id, user_message_id, identity_question, messages,
                    max_new_tokens or self.max_new_tokens, temperature)

    def answer(self, questions: list[str], *, system: object = PRODUCT_PROMPT, temperature: float = 0.0,
               max_new_tokens: int | None = None, adapter: str | Path = AdapterRef.ACTIVE) -> list[str]:
        """Answer one-off questions in a batch, not stored (the CLI's `ask`).

        system: PRODUCT_PROMPT (default), another prompt text, or None for no system message at all.
        adapter: AdapterRef.ACTIVE (default), AdapterRef.BASE, or a candidate adapter folder."""
        questions = [clean_text(q, what="question") for q in questions]
        prefix = [] if system is None else [
            {"role": "system", "content": self.system_prompt() if system is PRODUCT_PROMPT else str(system)}]
        return self.engine.generate([prefix + [{"role": "user", "content": q}] for q in questions], adapter=adapter,
                                    temperature=temperature, max_new_tokens=max_new_tokens or self.max_new_tokens)

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
        user_id = self.store.users.get_or_create(channel, user)["id"] if user is not None else None
        try:
            self.store.conversations.rate(message_id, user_id, rating)
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
        return self.store.corrections.add(
            question=question["text"], wrong_answer=message["text"], corrected_answer=corrected_answer,
            channel=channel, submitter=str(submitter) if submitter is not None else None, message_id=message_id)

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
