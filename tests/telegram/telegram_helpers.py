"""What the Telegram tests share: ids, running the bot against the fake, a scripted engine.

pytest-asyncio isn't installed: a test writes its scenario as a coroutine and hands it to ``drive``,
which runs it with asyncio.run while the bot polls; waits use FakeTelegram's *_async helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from bot.telegram import build_application, running

USER = 42  # a private chat's id is its user's id
OTHER = 43
THIRD = 44
ADMIN = 7
GROUP = -1001
FAST = {"edit_every_s": 0.3, "group_edit_every_s": 0.3, "progress_every_s": 0.5, "announce_every_s": 0.3}


@contextlib.asynccontextmanager
async def bot_running(tg, chat, admin, *, admin_ids=(ADMIN,), **options):
    """The selfcog bot polling the fake for the body of the block."""
    application = build_application(chat, admin, token=tg.token, base_url=tg.base_url, admin_ids=admin_ids,
                                    **{**FAST, **options})
    async with running(application, poll_timeout=1):
        yield application


def drive(tg, chat, admin, scenario, **options):
    """Run ``await scenario(application)`` while the bot polls the fake; returns what the scenario returns."""

    async def main():
        async with bot_running(tg, chat, admin, **options) as application:
            return await scenario(application)

    return asyncio.run(main())


def keyboard_data(message: dict) -> list[str]:
    return [b["callback_data"] for row in message.get("reply_markup", {}).get("inline_keyboard", []) for b in row]


def finished(tg, chat_id: int) -> list[dict]:
    """The bot's answers in a chat that are done: the rating keyboard is under them."""
    return [m for m in tg.messages(chat_id) if keyboard_data(m)]


def answers_in(store, chat_id: int) -> list[dict]:
    conversation = store.conversations.latest("telegram", str(chat_id))
    return [m for m in store.conversations.messages(conversation) if m["role"] == "assistant"]


class ScriptedReply:
    """What a Turn reads of an engine's reply: the pieces, then a few numbers."""

    def __init__(self, pieces, prompt_tokens: int):
        self._pieces = pieces
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.adapter_version = self.first_token_s = None

    def __iter__(self):
        for piece in self._pieces:
            self.completion_tokens += 1
            yield piece


class ScriptedEngine:
    """An engine that 'generates' a fixed text in pieces, no model: for tests where the words don't
    matter, through the real ChatService/Turn path.

    held: while this Event is clear, every reply stops after its first piece (a long answer in progress)."""

    name = "scripted"
    adapter_version = None
    adapter_error = None

    def __init__(self, text: str, *, piece_chars: int = 300, piece_s: float = 0.02,
                 held: threading.Event | None = None):
        self.text, self.piece_chars, self.piece_s, self.held = text, piece_chars, piece_s, held

    def stream(self, messages, **options) -> ScriptedReply:
        def pieces():
            for i, start in enumerate(range(0, len(self.text), self.piece_chars)):
                if i and self.held is not None:
                    self.held.wait(60)
                time.sleep(self.piece_s)
                yield self.text[start:start + self.piece_chars]

        return ScriptedReply(pieces(), prompt_tokens=len(messages))

    def close(self):
        pass
