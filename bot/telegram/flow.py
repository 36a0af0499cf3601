"""How updates come in and calls go out: per-chat order, per-user limits, Telegram's flood control.

    processor = ChatOrderedUpdates(16, admit=door)       # ApplicationBuilder().concurrent_updates(processor)
    limiter = PatientRateLimiter()                       # ApplicationBuilder().rate_limiter(limiter)
    await bot.edit_message_text(..., rate_limit_args=300)  # keep trying this call for up to 5 min
    refused = UserLimits(12, 60).take(user_id)           # None, or how long to wait and whether to say so

Both PTB classes are PTB's own extension points (BaseUpdateProcessor, BaseRateLimiter); the stock
ones fall short here in two ways, measured against a Bot API server: PTB's processors take a shared
slot *before* an update waits for its chat, so two users with a backlog held every slot and a third
user's /whoami waited minutes; and AIORateLimiter reopens its 429 gate as soon as any other request
finishes, so other chats kept sending inside Telegram's ``retry_after`` window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import httpx
from aiolimiter import AsyncLimiter
from telegram import Update
from telegram.constants import FloodLimit
from telegram.error import BadRequest, NetworkError, RetryAfter
from telegram.ext import BaseRateLimiter, BaseUpdateProcessor

log = logging.getLogger(__name__)


# --- updates in: one chat at a time, chats side by side ----------------------------------------------

class ChatOrderedUpdates(BaseUpdateProcessor):
    """Messages of one chat are handled one after another; different chats side by side.

    An update first waits for its chat's turn, holding nothing shared, and only then takes one of
    ``max_running`` slots, so a backlog in one chat never delays another chat. PTB's own semaphore
    (taken before ``do_process_update``) is set so high that it only bounds updates in flight.
    Button presses skip the chat queue: they are quick, and Telegram wants their answer in seconds.

    admit(update): awaited before an update queues; False turns it away (the per-user rate limit,
    so a flood is refused at the door, not after waiting its turn). After ``stop_starting()`` updates
    still queued go to ``turned_away(update)`` instead of their handlers (the bot is stopping).
    """

    IN_FLIGHT = 100_000

    def __init__(self, max_running: int, *, admit: Callable[[object], Awaitable[bool]] | None = None,
                 turned_away: Callable[[object], Awaitable[None]] | None = None):
        super().__init__(self.IN_FLIGHT)
        self.max_running = max_running
        self.admit = admit
        self.turned_away = turned_away
        self.stopping = False
        self._slots = asyncio.BoundedSemaphore(max_running)
        self._chats: dict[int, _ChatQueue] = {}

    async def initialize(self) -> None:
        self.stopping = False

    async def shutdown(self) -> None:
        pass

    def stop_starting(self) -> None:
        """Run no more handlers: what is still queued goes to ``turned_away``."""
        self.stopping = True

    async def do_process_update(self, update: object, coroutine: Awaitable) -> None:
        if self.admit is not None and not await self.admit(update):
            coroutine.close()  # never awaited: close it, or Python warns
            return
        chat_id = _queued_chat(update)
        queue = self._chats.setdefault(chat_id, _ChatQueue()) if chat_id is not None else None
        if queue is not None:
            queue.waiting += 1
        try:
            async with queue.lock if queue else contextlib.nullcontext(), self._slots:
                if self.stopping:
                    coroutine.close()
                    if self.turned_away is not None:
                        await self.turned_away(update)
                    return
                await coroutine
        finally:
            if queue is not None:
                queue.waiting -= 1
                if not queue.waiting:
                    del self._chats[chat_id]


@dataclass
class _ChatQueue:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: updates keep their order
    waiting: int = 0  # updates queued or running here; the entry goes when it reaches 0


def _queued_chat(update: object) -> int | None:
    """The chat whose queue an update waits in; None for button presses and updates without a chat."""
    if not isinstance(update, Update) or update.callback_query is not None or update.effective_chat is None:
        return None
    return update.effective_chat.id


# --- per-user limits -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    wait_s: float  # until the user may again
    warn: bool  # the first refusal in a while: tell the user (later ones are dropped silently)


class UserLimits:
    """At most ``count`` actions per ``period`` seconds per user, over a sliding window.

        refused = limits.take(user_id)
        if refused: ...   # refused.wait_s until a retry goes through; refused.warn: say so (once a while)
    """

    FORGET_AFTER_USERS = 10_000

    def __init__(self, count: int, period: float, *, warn_every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.count, self.period, self.warn_every_s, self.clock = int(count), float(period), warn_every_s, clock
        self._taken: dict[int, deque[float]] = {}
        self._warned: dict[int, float] = {}

    def take(self, user_id: int) -> Refusal | None:
        """Counts one action and returns None, or returns a Refusal (and counts nothing)."""
        now = self.clock()
        if len(self._taken) > self.FORGET_AFTER_USERS:  # forget users whose window is over
            self._taken = {u: t for u, t in self._taken.items() if t and t[-1] > now - self.period}
        taken = self._taken.setdefault(user_id, deque())
        while taken and taken[0] <= now - self.period:
            taken.popleft()
        if len(taken) < self.count:
            taken.append(now)
            return None
        warn = now - self._warned.get(user_id, float("-inf")) >= self.warn_every_s
        if warn:
            self._warned[user_id] = now
        return Refusal(wait_s=taken[0] + self.period - now, warn=warn)


# --- calls out: Telegram's flood control -----------------------------------------------------------------

NOT_REPEATABLE = ("send", "forward", "copy")  # a repeat would show twice (sendChatAction excepted)


class PatientRateLimiter(BaseRateLimiter[float]):
    """Every call to Telegram passes here (getUpdates excepted, by PTB).

    - Flood limits (aiolimiter): 30 calls a second in all, 20 a minute per group, Telegram's figures.
    - HTTP 429 on any call pauses *every* call until its ``retry_after`` has passed, then retries it.
    - A call that failed on the network is retried with backoff when repeating it is harmless: an
      edit, or anything that never reached Telegram. A send whose answer was lost (a timeout, a 502)
      may have arrived, and is not sent again: twice would show twice.
    - How long to keep trying: ``rate_limit_args`` seconds when a call passes it (the final edit of a
      reply: minutes), else ``max_retries`` retries. Telegram's refusals (400, 403) are never retried.
    """

    def __init__(self, *, max_retries: int = 3, backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 overall_per_s: float = FloodLimit.MESSAGES_PER_SECOND,
                 group_per_minute: float = FloodLimit.MESSAGES_PER_MINUTE_PER_GROUP):
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self._overall = AsyncLimiter(overall_per_s, 1)
        self._group_per_minute = group_per_minute
        self._groups: dict[int | str, AsyncLimiter] = {}
        self._resume_at = 0.0  # loop time before which no call goes out (a 429's retry_after)

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def process_request(self, callback, args, kwargs, endpoint, data, rate_limit_args):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + rate_limit_args if rate_limit_args else None
        attempt = 0
        while True:
            try:
                for limiter in self._limiters(data.get("chat_id")):
                    await limiter.acquire()
                await self._paused()
                return await callback(*args, **kwargs)
            except RetryAfter as e:
                wait = _seconds(e.retry_after)
                self._resume_at = max(self._resume_at, loop.time() + wait)
                log.warning("Telegram answered %s with 429: every call waits %.1f s", endpoint, wait)
                if not self._may_retry(attempt, deadline, loop.time() + wait):
                    raise
            except BadRequest:  # a NetworkError in PTB, but Telegram's refusal: asking again won't help
                raise
            except NetworkError as e:
                delay = min(self.backoff_s * 2**attempt, self.max_backoff_s)
                if not (_repeatable(endpoint) or _never_sent(e)) or not self._may_retry(
                        attempt, deadline, loop.time() + delay):
                    raise
                log.warning("Telegram %s failed on the network (%s); trying again in %.1f s", endpoint, e, delay)
                await asyncio.sleep(delay)
            attempt += 1

    def _may_retry(self, attempt: int, deadline: float | None, next_try: float) -> bool:
        return next_try <= deadline if deadline is not None else attempt < self.max_retries

    async def _paused(self) -> None:
        loop = asyncio.get_running_loop()
        while (wait := self._resume_at - loop.time()) > 0:
            await asyncio.sleep(wait)

    def _limiters(self, chat_id) -> list[AsyncLimiter]:
        """The flood limits a call to this chat counts against (none for calls about no chat)."""
        if chat_id is None:
            return []
        with contextlib.suppress(TypeError, ValueError):
            chat_id = int(chat_id)
        if isinstance(chat_id, int) and chat_id > 0:  # a private chat
            return [self._overall]
        if len(self._groups) > 512:  # forget idle groups
            self._groups = {k: v for k, v in self._groups.items() if not v.has_capacity(v.max_rate)}
        return [self._groups.setdefault(chat_id, AsyncLimiter(self._group_per_minute, 60)), self._overall]


def _seconds(retry_after: int | timedelta) -> float:
    return retry_after.total_seconds() if isinstance(retry_after, timedelta) else float(retry_after)


def _repeatable(endpoint: str) -> bool:
    return endpoint == "sendChatAction" or not endpoint.startswith(NOT_REPEATABLE)


def _never_sent(error: NetworkError) -> bool:
    """The request never left (no connection, or none free in the pool): a repeat can't double it."""
    return isinstance(error.__cause__, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
