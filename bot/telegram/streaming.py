"""A reply that grows as the model writes it: one message edited in place, more past 4096 characters.

    messages = await stream_turn(bot, chat_id, turn, pool=pool, reply_to=question_id, every_s=1.0,
                                 keyboard=lambda turn: answer_keyboard(turn.message_id, user_id),
                                 cut_short=stopping_event, patience_s=300)

Each message of a reply starts as a short placeholder and is then edited: an edit can be repeated
safely, a send cannot (if Telegram's answer to a send is lost, the message may be there anyway, and
a second send would show the reply twice; at worst a placeholder is left over). Every message is
edited at most once per ``every_s`` seconds, the last edit included, and only when its text changed.

The Turn (the model generating, then the answer being stored) runs in a worker thread. When
``cut_short`` is set (the bot is stopping) the model stops, the Turn stores what was said, and that
is shown with its buttons. The last edit keeps trying for ``patience_s`` (429s, outages); if it still
fails, the user is told in a new message, with the buttons, that the answer is saved.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor

from telegram import InlineKeyboardMarkup, Message
from telegram.constants import ChatAction
from telegram.error import NetworkError, TelegramError

from bot.chat import Turn
from bot.errors import UserError
from bot.telegram.text import edit, escape, send, split_text

log = logging.getLogger(__name__)

TYPING_EVERY_S = 4.5  # Telegram shows a chat action for 5 s
PLACEHOLDER = "…"
PLACEHOLDER_TRIES = 3
NO_ANSWER = "(I have no answer to that. Try asking another way.)"
CUT_SHORT = "(cut short: I had to restart. Ask again for a whole answer.)"
NOT_SHOWN = ("⚠️ Telegram would not let me finish showing the answer above. It is saved in full; ask me again to "
             "see it. You can still rate or correct it here.")


async def stream_turn(bot, chat_id: int, turn: Turn, *, pool: Executor, reply_to: int | None = None,
                      every_s: float = 1.0, keyboard: Callable[[Turn], InlineKeyboardMarkup | None] = lambda turn: None,
                      cut_short: asyncio.Event | None = None, patience_s: float = 300.0) -> list[Message]:
    """Show a Turn's reply as it streams; returns the messages it fills.

    A UserError of the Turn (the model failed) is shown in the reply; other errors propagate."""
    loop = asyncio.get_running_loop()
    cut_short = cut_short or asyncio.Event()
    changed = asyncio.Event()
    stop_generating, cut = False, False
    shown = _Shown(bot, chat_id, reply_to, every_s)
    await shown.start()

    def generate() -> None:  # in a worker thread
        nonlocal cut
        pieces = iter(turn)
        try:
            for _ in pieces:
                loop.call_soon_threadsafe(changed.set)
                if stop_generating:
                    cut = True
                    break
        finally:
            pieces.close()  # stops the engine when cut short; the Turn stores what was said

    generating = loop.run_in_executor(pool, generate)
    typing = loop.create_task(keep_typing(bot, chat_id, generating))
    try:
        while not generating.done() and not cut_short.is_set():
            if changed.is_set() and shown.next_edit_in() == 0:
                changed.clear()
                await shown.update(turn.text, final=False)
            elif changed.is_set():  # new words, but this message was edited less than every_s ago
                await _any(generating, cut_short.wait(), timeout=shown.next_edit_in())
            else:
                await _any(generating, changed.wait(), cut_short.wait())
        stop_generating = True
        problem = None
        try:
            await generating  # the Turn's errors come out here
        except UserError as e:  # the model failed: say so where the answer was going to be
            problem = f"⚠️ {e}"
        text = turn.text
        if cut:
            text = f"{text} … {CUT_SHORT}" if text else CUT_SHORT
        if problem:
            text = f"{text}\n\n{problem}" if text else problem
        markup = keyboard(turn) if turn.message_id else None
        patience = min(patience_s, every_s + 2) if cut_short.is_set() else patience_s  # stopping: be quick
        try:
            await shown.update(text, final=True, markup=markup, patience_s=patience)
        except TelegramError as e:
            log.error("could not show the end of answer %s in chat %s: %s", turn.message_id, chat_id, e)
            await _tell_not_shown(bot, chat_id, markup)
        return shown.messages
    finally:
        stop_generating = True
        typing.cancel()


async def _any(*waits, timeout: float | None = None) -> None:
    """Wait until one of the futures or coroutines is done, or timeout seconds have passed."""
    started = [asyncio.ensure_future(w) for w in waits if asyncio.iscoroutine(w)]
    try:
        await asyncio.wait([w for w in waits if not asyncio.iscoroutine(w)] + started, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in started:
            task.cancel()


async def _tell_not_shown(bot, chat_id: int, markup: InlineKeyboardMarkup | None) -> None:
    try:
        await send(bot, chat_id, escape(NOT_SHOWN), reply_markup=markup)
    except TelegramError as e:  # Telegram refuses everything: the answer is stored, nothing more to do
        log.error("could not tell chat %s that its answer is saved: %s", chat_id, e)


async def keep_typing(bot, chat_id: int, until: asyncio.Future) -> None:
    """"typing…" in the chat until ``until`` is done."""
    while not until.done():
        try:
            await bot.send_chat_action(chat_id, ChatAction.TYPING)
        except TelegramError as e:  # only cosmetic
            log.debug("typing action failed: %s", e)
        await asyncio.wait([until], timeout=TYPING_EVERY_S)


class _Shown:
    """The messages a reply fills so far, the text each shows, and when each was last touched."""

    def __init__(self, bot, chat_id: int, reply_to: int | None, every_s: float):
        self.bot, self.chat_id, self.reply_to, self.every_s = bot, chat_id, reply_to, every_s
        self.messages: list[Message] = []
        self.texts: list[str] = []
        self.touched: list[float] = []  # loop time of each message's last send or edit

    async def start(self) -> None:
        """The first message, a placeholder: the reply has a message to edit before the model writes."""
        await self._add(reply_to=self.reply_to)

    def next_edit_in(self) -> float:
        """Seconds until the newest message may be edited again (0: now)."""
        loop = asyncio.get_running_loop()
        return max(0.0, self.touched[-1] + self.every_s - loop.time()) if self.touched else 0.0

    async def update(self, text: str, *, final: bool, markup: InlineKeyboardMarkup | None = None,
                     patience_s: float | None = None) -> None:
        """Make the messages show text: edit the parts that changed, add a placeholder for each new one.

        While streaming, a message touched less than every_s ago waits for the next round, and a failed
        edit is only logged (the next one catches up). The final round waits its turn for each message,
        keeps trying for patience_s, and raises when it still fails."""
        loop = asyncio.get_running_loop()
        parts = split_text(text) or ([NO_ANSWER] if final else [])
        try:
            for i, part in enumerate(parts):
                if i == len(self.messages):
                    await self._add()
                    if not final:
                        return  # its first edit comes a round later
                last = i == len(parts) - 1
                part_markup = markup if final and last else None
                if part == self.texts[i] and part_markup is None:
                    continue
                wait = self.touched[i] + self.every_s - loop.time()
                if wait > 0:
                    if not final:
                        return
                    await asyncio.sleep(wait)
                await edit(self.bot, self.chat_id, self.messages[i].message_id, escape(part), part_markup,
                           patience_s=patience_s if final else None)
                self.texts[i], self.touched[i] = part, loop.time()
        except TelegramError as e:
            if final:
                raise
            log.warning("could not update a streaming reply in chat %s: %s", self.chat_id, e)

    async def _add(self, reply_to: int | None = None) -> None:
        """A new message, as a placeholder. When Telegram's answer to the send is lost it is sent again:
        at worst a "…" is left over, never a second copy of the answer."""
        for attempt in range(PLACEHOLDER_TRIES):
            try:
                message = await send(self.bot, self.chat_id, PLACEHOLDER, reply_to=reply_to)
                break
            except NetworkError as e:
                if attempt == PLACEHOLDER_TRIES - 1:
                    raise
                log.warning("sending a placeholder in chat %s failed (%s); sending another", self.chat_id, e)
        self.messages.append(message)
        self.texts.append(PLACEHOLDER)
        self.touched.append(asyncio.get_running_loop().time())
