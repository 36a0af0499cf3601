"""Text for Telegram: split at its 4096-character limit, escaped for HTML, sent with a plain-text fallback.

    >>> split_text("a" * 5000)                       # two parts, cut at a newline or space when there is one
    >>> await send(bot, chat_id, f"<b>{escape(name)}</b> is here")   # HTML; plain text if Telegram can't parse it

Every text the bot sends goes through ``send`` / ``edit``: bot-written HTML with the model's and
users' words passed through ``escape``, so a reply full of ``<``, ``&`` or Markdown never fails with
"can't parse entities"; if one still does, the same words go again as plain text.
"""

from __future__ import annotations

import html
import logging
import re

from telegram import InlineKeyboardMarkup, Message, ReplyParameters
from telegram.constants import ParseMode
from telegram.error import BadRequest

log = logging.getLogger(__name__)

MAX_MESSAGE_LENGTH = 4096  # Telegram's limit, in UTF-16 code units of the text after entity parsing
_SEPARATORS = ("\n\n", "\n", " ")  # where a long text is cut, best first
_TAG = re.compile(r"<[^>]+>")


def utf16_length(text: str) -> int:
    """Length as Telegram counts it: characters outside the BMP (most emoji) count twice."""
    return len(text) + sum(ord(c) > 0xFFFF for c in text)


def split_text(text: str, limit: int = MAX_MESSAGE_LENGTH) -> list[str]:
    """Cut a text into parts of at most ``limit`` (UTF-16 units), at a blank line, a newline or a space.

    A part is never shorter than half the limit because of the search for a separator; a text with
    no separator in that range (a long URL, CJK without spaces) is cut hard. Parts are stripped.
    While a text grows, every part but the last stays the same once the text has passed it, so a
    streamed reply can fill its messages one after another."""
    parts = []
    rest = text.strip()
    while rest:
        end = max(_fitting(rest, limit), 1)  # a character wider than the limit still goes
        if end == len(rest):
            parts.append(rest)
            break
        cut = _cut_at(rest, end)
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    return parts


def _fitting(text: str, limit: int) -> int:
    """How many leading characters of text fit in limit UTF-16 units."""
    units = 0
    for i, char in enumerate(text):
        units += 2 if ord(char) > 0xFFFF else 1
        if units > limit:
            return i
    return len(text)


def _cut_at(text: str, end: int) -> int:
    """Where to cut text whose first ``end`` characters fit: after the best separator in their second half."""
    window = text[: end + 1]  # a separator right after the last fitting character is as good
    for separator in _SEPARATORS:
        at = window.rfind(separator, end // 2)
        if at > 0:
            return at
    return end


def escape(text: object) -> str:
    """Text for HTML parse mode: only ``<``, ``>`` and ``&`` are special there."""
    return html.escape(str(text), quote=False)


def plain(html_text: str) -> str:
    """What an HTML text says, as plain text (the fallback when Telegram refuses the markup)."""
    return html.unescape(_TAG.sub("", html_text))


def is_not_modified(error: Exception) -> bool:
    return isinstance(error, BadRequest) and "not modified" in str(error).lower()


def is_parse_error(error: Exception) -> bool:
    return isinstance(error, BadRequest) and "can't parse entities" in str(error).lower()


async def send(bot, chat_id: int, html_text: str, *, reply_to: int | None = None,
               reply_markup=None, **kwargs) -> Message:
    """sendMessage in HTML; on "can't parse entities" the same words again as plain text.

    A text longer than Telegram allows goes as plain-text parts (the markup under the last);
    returns the last message sent."""
    reply = ReplyParameters(reply_to, allow_sending_without_reply=True) if reply_to else None
    if utf16_length(plain(html_text)) > MAX_MESSAGE_LENGTH:
        parts = split_text(plain(html_text))
        for part in parts[:-1]:
            await bot.send_message(chat_id, part, reply_parameters=reply, **kwargs)
            reply = None
        return await bot.send_message(chat_id, parts[-1], reply_parameters=reply, reply_markup=reply_markup,
                                      **kwargs)
    try:
        return await bot.send_message(chat_id, html_text, parse_mode=ParseMode.HTML, reply_parameters=reply,
                                      reply_markup=reply_markup, **kwargs)
    except BadRequest as e:
        if not is_parse_error(e):
            raise
        log.warning("Telegram could not parse our HTML (%s); sending plain text", e)
        return await bot.send_message(chat_id, plain(html_text), reply_parameters=reply,
                                      reply_markup=reply_markup, **kwargs)


async def edit(bot, chat_id: int, message_id: int, html_text: str,
               reply_markup: InlineKeyboardMarkup | None = None, *, patience_s: float | None = None) -> bool:
    """editMessageText in HTML with the plain-text fallback; False when Telegram says nothing changed.

    patience_s: how long to keep trying through 429s and outages (PatientRateLimiter); a text too
    long for one message is cut (the caller splits what must be kept whole)."""
    if utf16_length(plain(html_text)) > MAX_MESSAGE_LENGTH:
        html_text = escape(split_text(plain(html_text), MAX_MESSAGE_LENGTH - 1)[0] + "…")
    limits = {"rate_limit_args": patience_s} if patience_s else {}
    try:
        try:
            await bot.edit_message_text(html_text, chat_id=chat_id, message_id=message_id,
                                        parse_mode=ParseMode.HTML, reply_markup=reply_markup, **limits)
        except BadRequest as e:
            if not is_parse_error(e):
                raise
            log.warning("Telegram could not parse our HTML (%s); editing as plain text", e)
            await bot.edit_message_text(plain(html_text), chat_id=chat_id, message_id=message_id,
                                        reply_markup=reply_markup, **limits)
    except BadRequest as e:
        if is_not_modified(e):
            return False
        raise
    return True


def clip(text: object, limit: int) -> str:
    """At most limit characters of text, with "…" when cut (a user's words quoted back to them)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
