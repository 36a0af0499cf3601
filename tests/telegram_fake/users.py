"""What users do, as updates for the bot: messages, stickers, photos, voice notes, button presses.

    injected = user_message(api, 42, 42, text_content("/start"))
    injected.update_id, injected.message_id  # 1, 1

Users' mistakes are the test's mistakes here: a reply to a message that doesn't exist or a press
on a button the message doesn't have raises ValueError instead of making an update Telegram
could never send.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .bot_api import BotApi
from .markup import utf16_length

__all__ = [
    "Injected",
    "add_chat",
    "photo_content",
    "press_button",
    "sticker_content",
    "text_content",
    "user_message",
    "voice_content",
]


@dataclass(frozen=True)
class Injected:
    """What a user action put in the bot's update queue."""

    update_id: int
    chat_id: int
    message_id: int  # the user's new message; for a button press, the bot's message pressed
    callback_query_id: str | None = None  # set for button presses


# Telegram marks these in users' texts; PTB's CommandHandler needs the bot_command entity.
_COMMAND = re.compile(r"(?<!\S)/[A-Za-z0-9_]{1,64}(?:@[A-Za-z0-9_]{3,32})?(?![\w@])")
_MENTION = re.compile(r"(?<![\w@/])@[A-Za-z0-9_]{5,32}(?!\w)")
_URL = re.compile(r"(?<!\S)https?://\S+[^\s.,!?;:)]")


def text_entities(text: str) -> list[dict]:
    """The entities Telegram adds to a user's text: ``/commands``, ``@mentions`` and URLs."""
    found = []
    for kind, pattern in (("bot_command", _COMMAND), ("mention", _MENTION), ("url", _URL)):
        for match in pattern.finditer(text):
            offset = utf16_length(text[: match.start()])
            found.append({"type": kind, "offset": offset, "length": utf16_length(match.group())})
    return sorted(found, key=lambda entity: entity["offset"])


def text_content(text: str) -> dict:
    entities = text_entities(text)
    return {"text": text, "entities": entities} if entities else {"text": text}


def sticker_content(api: BotApi, emoji: str, data: bytes) -> dict:
    sticker = api.add_file("sticker", data, "webp")
    sticker.update(width=512, height=512, is_animated=False, is_video=False, type="regular", emoji=emoji)
    return {"sticker": sticker}


def photo_content(api: BotApi, data: bytes, caption: str | None, width: int, height: int) -> dict:
    photo = api.add_file("photo", data, "jpg")
    photo.update(width=width, height=height)
    content: dict = {"photo": [photo]}  # Telegram lists several sizes, smallest first; one will do
    if caption:
        content.update(caption=caption, **_caption_entities(caption))
    return content


def voice_content(api: BotApi, data: bytes, duration: int, mime_type: str) -> dict:
    voice = api.add_file("voice", data, "oga")
    voice.update(duration=duration, mime_type=mime_type)
    return {"voice": voice}


def _caption_entities(caption: str) -> dict:
    entities = text_entities(caption)
    return {"caption_entities": entities} if entities else {}


def _user(api: BotApi, user_id: int, username: str | None, first_name: str | None) -> dict:
    user = api.users.setdefault(user_id, {"id": user_id, "is_bot": False, "first_name": f"User {user_id}"})
    if first_name:
        user["first_name"] = first_name
    if username:
        user["username"] = username
    return user


def _chat(api: BotApi, chat_id: int, chat_type: str, user: dict | None, title: str | None) -> dict:
    known = api.chats.get(chat_id)
    if known and known["type"] != chat_type:
        raise ValueError(f"chat {chat_id} is a {known['type']} chat, not {chat_type}")
    if chat_type == "private":
        if user is not None and chat_id != user["id"]:
            raise ValueError(f"a private chat's id is its user's id: chat_id={chat_id}, user_id={user['id']}")
        chat = {"id": chat_id, "type": "private", "first_name": (user or {}).get("first_name", f"User {chat_id}")}
        if user and "username" in user:
            chat["username"] = user["username"]
    elif chat_type in ("group", "supergroup"):
        if chat_id >= 0:
            raise ValueError(f"group chat ids are negative on Telegram (e.g. -1001234), not {chat_id}")
        chat = {"id": chat_id, "type": chat_type, "title": title or (known or {}).get("title") or f"Group {-chat_id}"}
    else:
        raise ValueError(f"chat_type must be 'private', 'group' or 'supergroup', not {chat_type!r}")
    api.chats[chat_id] = chat
    return chat


def add_chat(api: BotApi, chat_id: int, chat_type: str, title: str | None = None) -> dict:
    """Makes a chat known before any user wrote in it, so the bot can write there first."""
    with api.lock:
        return dict(_chat(api, chat_id, chat_type, None, title))


def user_message(
    api: BotApi,
    chat_id: int,
    user_id: int,
    content: dict,
    *,
    chat_type: str = "private",
    username: str | None = None,
    first_name: str | None = None,
    title: str | None = None,
    reply_to: int | None = None,
) -> Injected:
    """A user's new message in a chat, queued as a "message" update."""
    with api.lock:
        user = _user(api, user_id, username, first_name)
        chat = _chat(api, chat_id, chat_type, user, title)
        target = None
        if reply_to is not None:
            target = api.messages.get((chat_id, int(reply_to)))
            if target is None:
                raise ValueError(f"no message {reply_to} in chat {chat_id} to reply to")
        message = api.new_message(chat, user, content, target)
        update_id = api.push_update("message", message)
        return Injected(update_id, chat_id, message["message_id"])


def press_button(api: BotApi, chat_id: int, user_id: int, message_id: int, callback_data: str) -> Injected:
    """A user's press on an inline button of the bot's message, queued as a "callback_query" update."""
    with api.lock:
        message = api.messages.get((chat_id, message_id))
        if message is None:
            raise ValueError(f"no message {message_id} in chat {chat_id}")
        keyboard = message.get("reply_markup", {}).get("inline_keyboard", [])
        offered = [button.get("callback_data") for row in keyboard for button in row]
        if callback_data not in offered:
            raise ValueError(
                f"message {message_id} in chat {chat_id} has no button with callback_data "
                f"{callback_data!r}; it offers {offered}"
            )
        query_id = str(len(api.callback_queries) + 1)  # Telegram's are long digit strings too
        api.callback_queries[query_id] = None
        query = {
            "id": query_id,
            "from": dict(_user(api, user_id, None, None)),
            "message": message,
            "chat_instance": str(chat_id),  # one value per chat, as on Telegram
            "data": callback_data,
        }
        update_id = api.push_update("callback_query", query)
        return Injected(update_id, chat_id, message_id, query_id)
