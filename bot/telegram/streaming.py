"""A reply that grows as the model writes it: one message edited in place, more past 4096 characters.

    messages = await stream_turn(bot, chat_id, turn, pool=pool, reply_to=question_id, every_s=1.0,
                                 keyboard=lambda turn: answer_keyboard(turn.message_id, user_id))

The Turn (the model generating, then the answer being stored) runs in a worker thread; this
coroutine, on the event loop, shows its latest text: the first words as soon as they come, then an
edit at most every ``every_s`` seconds and only when the text changed (Telegram refuses an edit to
the same text, and edits count against its flood limits). "typing…" shows until the reply is done.
When the text passes Telegram's limit it continues in a new message; the keyboard goes under the last.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor

from telegram import InlineKeyboardMarkup, Message
from telegram.constants import ChatAction
from telegram.error import TelegramError

from bot.chat import Turn
from bot.telegram.text import edit, escape, send, split_text

log = logging.getLogger(__name__)

TYPING_EVERY_S = 4.5  # Telegram shows a chat action for 5 s
NO_ANSWER = "(I have no answer to that. Try asking another way.)"


class _Latest:
    """The newest text of a reply, handed from the generating thread to the event loop."""

    def __init__(self):
        self.text = ""
        self.changed = asyncio.Event()
        self.abandoned = False  # the bot is stopping: stop generating


async def stream_turn(bot, chat_id: int, turn: Turn, *, pool: Executor, reply_to: int | None = None,
                      every_s: float = 1.0,
                      keyboard: Callable[[Turn], InlineKeyboardMarkup | None] = lambda turn: None) -> list[Message]:
    """Show a Turn's reply as it streams; returns the messages it fills. Errors of the Turn propagate."""
    loop = asyncio.get_running_loop()
    latest = _Latest()

    def generate() -> None:  # in a worker thread
        pieces = iter(turn)
        try:
            for text in pieces:
                latest.text = text
                loop.call_soon_threadsafe(latest.changed.set)
                if latest.abandoned:
                    break
        finally:
            pieces.close()  # stops the engine when abandoned; the Turn stores what was said

    generating = loop.run_in_executor(pool, generate)
    typing = loop.create_task(keep_typing(bot, chat_id, generating))
    shown = _Shown(bot, chat_id, reply_to)
    try:
        last_push = float("-inf")
        while not generating.done():
            await _first(generating, latest.changed.wait())
            wait = every_s - (loop.time() - last_push)
            if wait > 0 and not generating.done():
                await asyncio.wait([generating], timeout=wait)  # throttled, unless the reply is done
            if generating.done():
                break
            latest.changed.clear()
            await shown.update(latest.text, final=False)
            last_push = loop.time()
        await generating  # raises what the Turn raised (ChatInputError: the model failed)
        await shown.update(turn.text, final=True, markup=keyboard(turn) if turn.message_id else None)
        return shown.messages
    except asyncio.CancelledError:
        latest.abandoned = True
        raise
    finally:
        typing.cancel()


async def _first(future: asyncio.Future, coroutine) -> None:
    """Wait until the future is done or the coroutine returns, whichever is first."""
    waiter = asyncio.ensure_future(coroutine)
    try:
        await asyncio.wait({future, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


async def keep_typing(bot, chat_id: int, until: asyncio.Future) -> None:
    """"typing…" in the chat until ``until`` is done."""
    while not until.done():
        try:
            await bot.send_chat_action(chat_id, ChatAction.TYPING)
        except TelegramError as e:  # only cosmetic
            log.debug("typing action failed: %s", e)
        await asyncio.wait([until], timeout=TYPING_EVERY_S)


class _Shown:
    """The messages a reply fills so far, and the text each shows."""

    def __init__(self, bot, chat_id: int, reply_to: int | None):
        self.bot, self.chat_id, self.reply_to = bot, chat_id, reply_to
        self.messages: list[Message] = []
        self.texts: list[str] = []

    async def update(self, text: str, *, final: bool, markup: InlineKeyboardMarkup | None = None) -> None:
        """Make the messages show text: edit the parts that changed, send the parts that are new.

        While streaming a failed edit is only logged (the next one catches up); the final one raises."""
        parts = split_text(text)
        if not parts:
            if not final:
                return
            parts = [NO_ANSWER]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            part_markup = markup if final and last else None
            try:
                if i == len(self.messages):
                    message = await send(self.bot, self.chat_id, escape(part), reply_markup=part_markup,
                                         reply_to=self.reply_to if i == 0 else None)
                    self.messages.append(message)
                    self.texts.append(part)
                elif part != self.texts[i] or part_markup is not None:
                    await edit(self.bot, self.chat_id, self.messages[i].message_id, escape(part), part_markup)
                    self.texts[i] = part
            except TelegramError as e:
                if final:
                    raise
                log.warning("could not update a streaming reply in chat %s: %s", self.chat_id, e)
                return
