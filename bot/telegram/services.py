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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from telegram.ext import Application, ContextTypes

from bot.admin import Admin
from bot.chat import ChatService
from bot.telegram.flow import UserLimits

log = logging.getLogger(__name__)

CHANNEL = "telegram"  # conversations, users and corrections from here are stored under this channel
KEY = "selfcog"  # where the Services live in bot_data
STOP_GRACE_S = 4.0  # on stop, how long replies being written may go on (docker stop kills after 10 s)


@dataclass
class Services:
    chat: ChatService
    admin: Admin
    admin_ids: frozenset[int]
    edit_every_s: float = 1.0  # between edits of a streaming reply (Telegram allows ~1 message/s per chat)
    group_edit_every_s: float = 3.0  # groups: 20 messages/min in all
    progress_every_s: float = 2.0  # how often /retrain's message looks at the run
    announce_every_s: float = 10.0  # how often finished retrains are looked for, to tell admins
    final_edit_patience_s: float = 300.0  # how long the last edit of a reply keeps trying past 429s and outages
    stop_grace_s: float = STOP_GRACE_S  # on stop, how long replies being written may go on before they are cut short
    messages: UserLimits = field(default_factory=lambda: UserLimits(12, 60))
    corrections: UserLimits = field(default_factory=lambda: UserLimits(6, 60))
    generation: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=8, thread_name_prefix="telegram-reply"))
    tasks: set[asyncio.Task] = field(default_factory=set)  # background work, cancelled when the bot stops
    watched_runs: set[int] = field(default_factory=set)  # retrains a /retrain message is following here
    prompts: dict[tuple[int, int], int] = field(default_factory=dict)  # (chat, ✏️ prompt message) → who may answer
    last_answers: dict[tuple[int, int], int] = field(default_factory=dict)  # (group, asker) → their last answer
    menu_missing: set[int] = field(default_factory=set)  # admins whose command menu Telegram refused at start
    cut_short: asyncio.Event = field(default_factory=asyncio.Event)  # set when stopping: finish replies now

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

    async def stop_background(self) -> None:
        """Cancels the background work (progress messages, announcements)."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


def services(context: ContextTypes.DEFAULT_TYPE | Application) -> Services:
    """The Services of a handler's context (or of the Application itself)."""
    application = context if isinstance(context, Application) else context.application
    return application.bot_data[KEY]
