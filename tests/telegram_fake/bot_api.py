"""The Telegram side of the fake: chats, messages, pending updates, and the Bot API methods on them.

    api = BotApi("123456:fake-token")
    status, payload = api.handle("123456:fake-token", "getMe", {})
    # status == 200, payload == {"ok": True, "result": {"id": 123456, "is_bot": True, ...}}

Everything runs under one lock. ``changed``, a Condition on it, is notified after every change:
long polls and the tests' ``wait_for`` sleep on it instead of polling. Answers follow the Bot API's
shapes and error texts; where a text could not be checked against Telegram it is marked so.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from .markup import EntityParseError, UnsupportedParseMode, parse_formatted

__all__ = ["ApiError", "BotApi", "Call", "NOT_MODIFIED", "MAX_TEXT_LENGTH"]

MAX_TEXT_LENGTH = 4096  # characters after entity parsing
NOT_MODIFIED = (
    "message is not modified: specified new message content and reply markup are exactly "
    "the same as a current content and reply markup of message"
)
CONFLICT = "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"
QUERY_INVALID = "query is too old and response timeout expired or query ID is invalid"
TEXT_BUTTON = "can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard"
CHAT_ACTIONS = {
    "typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice",
    "upload_document", "choose_sticker", "find_location", "record_video_note", "upload_video_note",
}  # fmt: skip
BUTTON_ACTIONS = {
    "url", "callback_data", "web_app", "login_url", "switch_inline_query", "copy_text", "pay",
    "switch_inline_query_current_chat", "switch_inline_query_chosen_chat", "callback_game",
}  # fmt: skip
REPLY_MARKUP_KINDS = {"inline_keyboard", "keyboard", "remove_keyboard", "force_reply"}
COMMAND = re.compile(r"[a-z0-9_]{1,32}")


class ApiError(Exception):
    """A Bot API error answer: ``raise ApiError(400, "Bad Request: chat not found")``."""

    def __init__(self, error_code: int, description: str, parameters: dict | None = None) -> None:
        super().__init__(description)
        self.error_code = error_code
        self.description = description
        self.parameters = parameters

    def payload(self) -> dict:
        body = {"ok": False, "error_code": self.error_code, "description": self.description}
        if self.parameters:
            body["parameters"] = self.parameters
        return body


def bad_request(what: str) -> ApiError:
    return ApiError(400, f"Bad Request: {what}")


def flood_error(retry_after: float) -> ApiError:
    """Telegram's flood-control answer; it sends whole seconds, fractions are a test-speed nicety."""
    shown = int(retry_after) if float(retry_after).is_integer() else retry_after
    return ApiError(429, f"Too Many Requests: retry after {shown}", {"retry_after": shown})


@dataclass
class Call:
    """One request the bot made: ``tg.calls_to("sendMessage")[-1].params["text"]``."""

    method: str  # as the bot spelled it
    params: dict  # decoded: numbers, booleans and objects as JSON values, text as str
    time: float  # time.monotonic() when the request arrived
    status: int  # the HTTP status answered
    response: dict  # the JSON answered: {"ok": True, "result": ...} or the error
    files: dict[str, bytes] = field(default_factory=dict)  # multipart uploads by part name

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def result(self):
        return self.response.get("result")

    @property
    def description(self) -> str | None:
        return self.response.get("description")


@dataclass
class _Failure:
    """An answer forced on the next ``times`` calls of ``method``."""

    method: str  # lower case, as Bot API method names are case-insensitive
    times: int
    error: ApiError
    applied: bool = False  # the call takes effect before the error is answered


_METHODS: dict[str, Callable[[BotApi, dict], object]] = {}


def _bot_method(name: str):
    """Registers a BotApi method as the implementation of the Bot API method ``name``."""

    def register(implementation):
        _METHODS[name.lower()] = implementation
        return implementation

    return register


def _json_value(params: dict, name: str, default=None):
    """A parameter that is a JSON object or array; some clients send those as JSON text."""
    value = params.get(name, default)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise bad_request(f"can't parse {name} JSON object") from None
    return value


def _int_value(params: dict, name: str, default: int | None = None) -> int:
    value = params.get(name, default)
    if value is None or value == "":
        raise bad_request(f"{name} is empty")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise bad_request(f"invalid {name} specified") from None


class BotApi:
    """Telegram as one bot sees it; ``handle`` answers a request, the rest is state for the tests."""

    def __init__(
        self,
        token: str,
        *,
        bot_username: str = "selfcog_test_bot",
        bot_name: str = "Selfcog Test",
        clock: Callable[[], float] = time.time,
    ) -> None:
        bot_id = token.split(":", 1)[0]
        self.token = token
        self.bot = {  # the User object in "from" of the bot's messages
            "id": int(bot_id) if bot_id.isdigit() else 1,
            "is_bot": True,
            "first_name": bot_name,
            "username": bot_username,
        }
        self.clock = clock  # seconds since the epoch, for message dates
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.closed = False

        self.users: dict[int, dict] = {}
        self.chats: dict[int, dict] = {}
        self.messages: dict[tuple[int, int], dict] = {}  # (chat id, message id) → now; deleted ones removed
        self._last_message_id: dict[int, int] = defaultdict(int)  # message ids count per chat
        self.updates: list[dict] = []  # not yet confirmed by a getUpdates offset
        self._last_update_id = 0
        self._current_poll = 0  # the newest getUpdates; an older one still waiting answers 409
        self.callback_queries: dict[str, dict | None] = {}  # id → the answer's params, None until answered
        self.files: dict[str, dict] = {}  # file_id → {"file": File object, "path": file_path, "data": bytes}
        self.commands: dict[tuple[str, str], list[dict]] = {}  # (scope JSON, language) → commands
        self.profile_texts: dict[tuple[str, str], str] = {}  # (field, language) → description etc.

        self.calls: list[Call] = []
        self.sent: list[dict] = []  # messages the bot sent, as they were when sent
        self.failures: list[_Failure] = []

    # --- requests --------------------------------------------------------------------------

    def handle(self, token: str, method: str, params: dict, files: dict | None = None) -> tuple[int, dict]:
        """Answers one Bot API request and logs it; returns the HTTP status and the JSON body."""
        arrived = time.monotonic()
        with self.lock:
            try:
                if self.closed:  # a bot still polling a closed fake must back off, not spin
                    raise ApiError(502, "Bad Gateway: FakeTelegram is closed")
                if token != self.token:
                    raise ApiError(401, "Unauthorized")
                failure = self._take_failure(method)
                if failure is not None and not failure.applied:
                    raise failure.error
                implementation = _METHODS.get(method.lower())
                if implementation is None:  # Telegram says just "Not Found"
                    raise ApiError(404, f"Not Found: FakeTelegram has no method {method!r}")
                status, payload = 200, {"ok": True, "result": implementation(self, params)}
                if failure is not None:  # done, but the answer is lost on the way back
                    raise failure.error
            except ApiError as error:
                status, payload = error.error_code, error.payload()
            except Exception as error:  # a gap in the fake: say so in the answer and the log, not by hanging up
                status, payload = 500, ApiError(500, f"Internal Server Error: FakeTelegram failed: {error!r}").payload()
            self.calls.append(Call(method, params, arrived, status, payload, files or {}))
            self.changed.notify_all()
            return status, payload

    def fail_next(self, method: str, error: ApiError, times: int = 1, applied: bool = False) -> None:
        with self.lock:
            self.failures.append(_Failure(method.lower(), times, error, applied))

    def _take_failure(self, method: str) -> _Failure | None:
        for failure in self.failures:
            if failure.method == method.lower() and failure.times > 0:
                failure.times -= 1
                if failure.times == 0:
                    self.failures.remove(failure)
                return failure
        return None

    def close(self) -> None:
        """Ends waiting long polls (they answer with no updates); later requests get HTTP 502."""
        with self.lock:
            self.closed = True
            self.changed.notify_all()

    # --- state the tests' side builds on ---------------------------------------------------

    def new_message(self, chat: dict, sender: dict, content: dict, reply_to: dict | None = None) -> dict:
        """Stores a new message in ``chat`` and returns it (the stored object, not a copy)."""
        self._last_message_id[chat["id"]] += 1
        message = {
            "message_id": self._last_message_id[chat["id"]],
            "from": dict(sender),
            "chat": dict(chat),
            "date": int(self.clock()),  # seconds: PTB reads it with datetime.fromtimestamp
            **content,
        }
        if reply_to is not None:  # Telegram doesn't nest replies further
            message["reply_to_message"] = {k: v for k, v in reply_to.items() if k != "reply_to_message"}
        self.messages[(chat["id"], message["message_id"])] = message
        self.changed.notify_all()
        return message

    def push_update(self, kind: str, payload: dict) -> int:
        """Queues an update for the bot's next getUpdates; returns its update_id."""
        self._last_update_id += 1
        self.updates.append({"update_id": self._last_update_id, kind: copy.deepcopy(payload)})
        self.changed.notify_all()
        return self._last_update_id

    def add_file(self, kind: str, data: bytes, extension: str) -> dict:
        """Registers bytes a user sends (a photo, a voice note) for getFile; returns the File object."""
        number = len(self.files) + 1
        file = {"file_id": f"{kind}-{number}", "file_unique_id": f"u{kind}{number}", "file_size": len(data)}
        self.files[file["file_id"]] = {"file": file, "path": f"{kind}/file_{number}.{extension}", "data": data}
        return dict(file)

    def file_data(self, path: str) -> bytes | None:
        with self.lock:
            return next((f["data"] for f in self.files.values() if f["path"] == path), None)

    # --- helpers of the methods ------------------------------------------------------------

    def _chat(self, params: dict) -> dict:
        chat_id = params.get("chat_id")
        if chat_id is None or chat_id == "":
            raise bad_request("chat_id is empty")
        if isinstance(chat_id, str) and chat_id.startswith("@"):
            name = chat_id[1:].lower()
            chat = next((c for c in self.chats.values() if c.get("username", "").lower() == name), None)
        else:
            try:
                chat = self.chats.get(int(chat_id))
            except (TypeError, ValueError):
                chat = None
        if chat is None:  # the bot can only write where a user wrote first (or tg.add_chat)
            raise bad_request("chat not found")
        return chat

    def _bot_message(self, params: dict, not_found: str) -> dict:
        """The bot's own message that params point at, for edits."""
        if params.get("inline_message_id"):
            raise bad_request("inline messages are not supported by FakeTelegram")
        chat = self._chat(params)
        message = self.messages.get((chat["id"], _int_value(params, "message_id")))
        if message is None:
            raise bad_request(not_found)
        if message["from"]["id"] != self.bot["id"]:
            raise bad_request("message can't be edited")
        return message

    def _reply_target(self, chat: dict, params: dict) -> dict | None:
        reply = _json_value(params, "reply_parameters") or {}
        message_id = reply.get("message_id", params.get("reply_to_message_id"))
        if message_id is None:
            return None
        target = self.messages.get((chat["id"], int(message_id)))
        may_go_without = reply.get("allow_sending_without_reply") or params.get("allow_sending_without_reply")
        if target is None and not may_go_without:
            raise bad_request("message to be replied not found")
        return target

    @staticmethod
    def _formatted_text(params: dict) -> tuple[str, list[dict]]:
        """The text and entities Telegram makes of text + parse_mode (or text + entities)."""
        text = params.get("text")
        if text is None or text == "":
            raise bad_request("message text is empty")
        text = str(text)
        if params.get("parse_mode"):
            try:
                text, entities = parse_formatted(text, params["parse_mode"])
            except UnsupportedParseMode:
                raise bad_request("unsupported parse_mode") from None
            except EntityParseError as error:
                raise bad_request(f"can't parse entities: {error}") from None
        else:
            entities = list(_json_value(params, "entities") or [])
        if not text.strip():
            raise bad_request("message text is empty")
        if len(text) > MAX_TEXT_LENGTH:
            raise bad_request("message is too long")
        return text, entities

    @staticmethod
    def _inline_keyboard(params: dict) -> dict | None:
        """Checks reply_markup; returns it when it is an inline keyboard, the only kind a message shows."""
        markup = _json_value(params, "reply_markup")
        if not markup:
            return None
        if not isinstance(markup, dict) or not REPLY_MARKUP_KINDS & markup.keys():
            raise bad_request("can't parse reply keyboard markup JSON object")
        if "inline_keyboard" not in markup:
            return None  # ForceReply and reply keyboards act on the user's client, not the message
        rows = markup["inline_keyboard"]
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise bad_request('field "inline_keyboard" of the InlineKeyboardMarkup should be an Array of Arrays')
        for button in (button for row in rows for button in row):
            if not isinstance(button, dict) or not button.get("text") or not BUTTON_ACTIONS & button.keys():
                raise bad_request(TEXT_BUTTON)
            if "callback_data" in button and not 1 <= len(str(button["callback_data"]).encode()) <= 64:
                raise bad_request("BUTTON_DATA_INVALID")
        rows = [row for row in rows if row]
        return {"inline_keyboard": copy.deepcopy(rows)} if rows else None

    # --- the Bot API ------------------------------------------------------------------------

    @_bot_method("getMe")
    def get_me(self, params: dict) -> dict:
        return {
            **self.bot,
            "can_join_groups": True,
            "can_read_all_group_messages": False,  # privacy mode on, Telegram's default
            "supports_inline_queries": False,
        }

    @_bot_method("deleteWebhook")
    def delete_webhook(self, params: dict) -> bool:
        if params.get("drop_pending_updates"):
            self.updates.clear()
        return True

    @_bot_method("getUpdates")
    def get_updates(self, params: dict) -> list[dict]:
        """Long polling: answers at once when updates wait, else when one arrives or timeout passes."""
        offset = _int_value(params, "offset", 0)
        limit = min(max(_int_value(params, "limit", 100), 1), 100)
        timeout = max(float(params.get("timeout") or 0), 0.0)
        allowed = _json_value(params, "allowed_updates") or []
        if offset > 0:  # confirms every update before offset
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
        elif offset < 0:  # "the last -offset updates"; the others are forgotten
            self.updates = self.updates[offset:]
        if allowed:
            self.updates = [u for u in self.updates if _update_kind(u) in allowed]  # never delivered

        self._current_poll += 1
        this_poll = self._current_poll
        self.changed.notify_all()  # an older poll still waiting wakes up and answers 409
        deadline = time.monotonic() + timeout
        while True:
            if this_poll != self._current_poll:
                raise ApiError(409, CONFLICT)
            if self.updates or self.closed:
                return copy.deepcopy(self.updates[:limit])
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self.changed.wait(remaining)

    @_bot_method("sendMessage")
    def send_message(self, params: dict) -> dict:
        text, entities = self._formatted_text(params)  # Telegram parses markup before it looks for the chat
        chat = self._chat(params)
        reply_to = self._reply_target(chat, params)
        content: dict = {"text": text}
        if entities:
            content["entities"] = entities
        if keyboard := self._inline_keyboard(params):
            content["reply_markup"] = keyboard
        message = self.new_message(chat, self.bot, content, reply_to)
        self.sent.append(copy.deepcopy(message))
        return copy.deepcopy(message)

    @_bot_method("editMessageText")
    def edit_message_text(self, params: dict) -> dict:
        message = self._bot_message(params, "message to edit not found")
        text, entities = self._formatted_text(params)
        if "text" not in message:
            raise bad_request("there is no text in the message to edit")
        # Without reply_markup an edit drops the inline keyboard, as on Telegram.
        keyboard = self._inline_keyboard(params)
        if (text, entities, keyboard) == (message["text"], message.get("entities", []), message.get("reply_markup")):
            raise bad_request(NOT_MODIFIED)
        message["text"] = text
        _set_or_drop(message, "entities", entities)
        _set_or_drop(message, "reply_markup", keyboard)
        message["edit_date"] = int(self.clock())
        return copy.deepcopy(message)

    @_bot_method("editMessageReplyMarkup")
    def edit_message_reply_markup(self, params: dict) -> dict:
        message = self._bot_message(params, "message to edit not found")
        keyboard = self._inline_keyboard(params)
        if keyboard == message.get("reply_markup"):
            raise bad_request(NOT_MODIFIED)
        _set_or_drop(message, "reply_markup", keyboard)
        message["edit_date"] = int(self.clock())
        return copy.deepcopy(message)

    @_bot_method("deleteMessage")
    def delete_message(self, params: dict) -> bool:
        chat = self._chat(params)
        if self.messages.pop((chat["id"], _int_value(params, "message_id")), None) is None:
            raise bad_request("message to delete not found")
        return True

    @_bot_method("answerCallbackQuery")
    def answer_callback_query(self, params: dict) -> bool:
        query_id = str(params.get("callback_query_id") or "")
        if query_id not in self.callback_queries or self.callback_queries[query_id] is not None:
            raise bad_request(QUERY_INVALID)  # unknown, or answered already
        self.callback_queries[query_id] = dict(params)
        return True

    @_bot_method("sendChatAction")
    def send_chat_action(self, params: dict) -> bool:
        self._chat(params)
        if params.get("action") not in CHAT_ACTIONS:
            raise bad_request("wrong parameter action in request")
        return True

    @_bot_method("getFile")
    def get_file(self, params: dict) -> dict:
        stored = self.files.get(str(params.get("file_id") or ""))
        if stored is None:
            raise bad_request("invalid file_id")
        return {**stored["file"], "file_path": stored["path"]}

    @_bot_method("setMyCommands")
    def set_my_commands(self, params: dict) -> bool:
        commands = _json_value(params, "commands")
        if not isinstance(commands, list):
            raise bad_request("commands is empty")  # text unchecked against Telegram
        for command in commands:
            if not COMMAND.fullmatch(str(command.get("command", ""))):
                raise bad_request("BOT_COMMAND_INVALID")
            if not 1 <= len(str(command.get("description", ""))) <= 256:
                raise bad_request("BOT_COMMAND_DESCRIPTION_INVALID")  # text unchecked against Telegram
        scope = _json_value(params, "scope") or {}
        if "chat_id" in scope:  # a chat's own menu: only once the chat exists (a user wrote first)
            self._chat(scope)
        self.commands[_commands_key(params)] = [
            {"command": c["command"], "description": c["description"]} for c in commands
        ]
        return True

    @_bot_method("getMyCommands")
    def get_my_commands(self, params: dict) -> list[dict]:
        return copy.deepcopy(self.commands.get(_commands_key(params), []))

    @_bot_method("deleteMyCommands")
    def delete_my_commands(self, params: dict) -> bool:
        self.commands.pop(_commands_key(params), None)
        return True

    def _set_profile_text(self, params: dict, field_name: str) -> bool:
        self.profile_texts[(field_name, params.get("language_code") or "")] = str(params.get(field_name) or "")
        return True

    def _get_profile_text(self, params: dict, field_name: str) -> dict:
        return {field_name: self.profile_texts.get((field_name, params.get("language_code") or ""), "")}

    @_bot_method("setMyDescription")
    def set_my_description(self, params: dict) -> bool:
        return self._set_profile_text(params, "description")

    @_bot_method("getMyDescription")
    def get_my_description(self, params: dict) -> dict:
        return self._get_profile_text(params, "description")

    @_bot_method("setMyShortDescription")
    def set_my_short_description(self, params: dict) -> bool:
        return self._set_profile_text(params, "short_description")

    @_bot_method("getMyShortDescription")
    def get_my_short_description(self, params: dict) -> dict:
        return self._get_profile_text(params, "short_description")

    @_bot_method("setMyName")
    def set_my_name(self, params: dict) -> bool:
        return self._set_profile_text(params, "name")

    @_bot_method("getMyName")
    def get_my_name(self, params: dict) -> dict:
        return self._get_profile_text(params, "name")


def _update_kind(update: dict) -> str:
    return next(key for key in update if key != "update_id")


def _commands_key(params: dict) -> tuple[str, str]:
    scope = _json_value(params, "scope") or {"type": "default"}
    return json.dumps(scope, sort_keys=True), params.get("language_code") or ""


def _set_or_drop(message: dict, key: str, value) -> None:
    """Telegram leaves empty fields out of a message rather than sending them empty."""
    if value:
        message[key] = value
    else:
        message.pop(key, None)
