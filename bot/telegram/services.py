"""What every handler reaches through ``context.bot_data``: the chat service, admin actions, settings, limits.

    bot = services(context)
    turn = await bot.call(bot.chat.send, conversation, text)   # store and model work off the event loop

Blocking work never runs on the event loop: short store calls go through ``call`` (asyncio's default
thread pool); streaming a reply, which holds a thread for its whole generation, goes to ``generation``,
a pool of its own, so a few long answers can never starve the quick calls of everybody else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from aiolimiter import AsyncLimiter
from telegram.ext import ContextTypes

from bot.admin import Admin
from bot.chat import ChatService

log = logging.getLogger(__name__)

CHANNEL = "telegram"  # conversations, users and corrections from here are stored under this channel
KEY = "selfcog"  # where the Services live in bot_data


class UserLimits:
    """A token bucket per user (aiolimiter's leaky bucket): ``max_rate`` actions per ``period`` seconds.

    ``allow(user)`` takes a token when there is one; when there isn't, the first refusal in a while
    returns "warn" (tell the user once) and the rest "drop" (say nothing, a flood gets no answers)."""

    def __init__(self, max_rate: float, period: float, *, warn_every_s: float = 30.0):
        self.max_rate, self.period, self.warn_every_s = max_rate, period, warn_every_s
        self._buckets: dict[int, AsyncLimiter] = {}
        self._warned: dict[int, float] = {}

    async def allow(self, user_id: int) -> str:
        bucket = self._buckets.setdefault(user_id, AsyncLimiter(self.max_rate, self.period))
        if bucket.has_capacity():
            await bucket.acquire()  # returns at once: there is capacity
            return "ok"
        now = time.monotonic()
        if now - self._warned.get(user_id, -self.warn_every_s) >= self.warn_every_s:
            self._warned[user_id] = now
            return "warn"
        return "drop"


@dataclass
class Services:
    chat: ChatService
    admin: Admin
    admin_ids: frozenset[int]
    edit_every_s: float = 1.0  # between edits of a streaming reply (Telegram allows ~1 message/s per chat)
    group_edit_every_s: float = 3.0  # groups: 20 messages/min in all
    progress_every_s: float = 2.0  # how often /retrain's message looks at the run
    announce_every_s: float = 10.0  # how often finished retrains are looked for, to tell admins
    messages: UserLimits = field(default_factory=lambda: UserLimits(12, 60))
    corrections: UserLimits = field(default_factory=lambda: UserLimits(6, 60))
    generation: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=8, thread_name_prefix="telegram-reply"))
    tasks: set[asyncio.Task] = field(default_factory=set)  # background work, cancelled when the bot stops
    watched_runs: set[int] = field(default_factory=set)  # retrains a /retrain message is following here
    prompts: dict[tuple[int, int], int] = field(default_factory=dict)  # (chat, ✏️ prompt message) → who may answer
    chat_locks: dict[int, asyncio.Lock] = field(default_factory=dict)

    def is_admin(self, user_id: int | None) -> bool:
        return user_id is not None and user_id in self.admin_ids

    async def call(self, fn, *args, **kwargs):
        """Run a blocking call (the store, the chat service) in a worker thread and await it."""
        return await asyncio.to_thread(partial(fn, *args, **kwargs))

    def spawn(self, coroutine) -> asyncio.Task:
        """Start background work that outlives the update (progress, announcements); stopped with the bot."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(_log_failure)
        return task

    def chat_lock(self, chat_id: int) -> asyncio.Lock:
        """Answers in one chat come one after another (the history stays in order); chats run side by side."""
        return self.chat_locks.setdefault(chat_id, asyncio.Lock())

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.generation.shutdown(wait=False, cancel_futures=True)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


def services(context: ContextTypes.DEFAULT_TYPE) -> Services:
    return context.application.bot_data[KEY]
