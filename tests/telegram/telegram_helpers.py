"""What the Telegram tests share: ids, running the bot against the fake, a scripted engine.

pytest-asyncio isn't installed: a test writes its scenario as a coroutine and hands it to ``drive``,
which runs it with asyncio.run while the bot polls; waits use FakeTelegram's *_async helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from bot.engine import Reply
from bot.telegram import build_application, running

USER = 42  # a private chat's id is its user's id
OTHER = 43
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


class ScriptedEngine:
    """An engine that 'generates' a fixed text in pieces (the real Reply class, no model): for replies
    longer than the embedded model writes in a test's time, through the real ChatService/Turn path."""

    name = "scripted"
    adapter_version = None

    def __init__(self, text: str, *, piece_chars: int = 300, piece_s: float = 0.02):
        self.text, self.piece_chars, self.piece_s = text, piece_chars, piece_s

    def stream(self, messages, *, max_new_tokens=None, temperature=0.0) -> Reply:
        def pieces():
            for start in range(0, len(self.text), self.piece_chars):
                time.sleep(self.piece_s)
                yield self.text[start:start + self.piece_chars]

        reply = Reply(pieces(), prompt_tokens=len(messages))
        reply.adapter_version = None
        reply._done.set()  # no worker thread fills in stats later
        return reply

    def close(self):
        pass
