"""FakeTelegram: a loopback Telegram Bot API for end-to-end tests of a python-telegram-bot bot.

    with FakeTelegram() as tg:
        application = tg.application_builder().build()   # token, base_url, base_file_url set
        ...                                               # start it polling (see the tests)
        sent = tg.send_text(42, 42, "hello")              # user 42 writes in their private chat
        reply = await tg.wait_for_message_async(42, contains="hello", since=sent)

The bot talks real HTTP to 127.0.0.1; the test acts as users (send_text, press_button, …),
shapes answers (fail_next) and observes (calls, sent, messages, wait_for…). All of it is
thread-safe; ids count up from 1, so runs are repeatable.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import Callable
from typing import TypeVar

from .bot_api import ApiError, BotApi, Call, flood_error
from .server import ApiServer
from .users import (
    Injected,
    add_chat,
    photo_content,
    press_button,
    sticker_content,
    text_content,
    user_message,
    voice_content,
)

__all__ = ["FakeTelegram", "DEFAULT_TOKEN", "polling"]

DEFAULT_TOKEN = "123456:fake-token"  # "<bot id>:<secret>", like a real token
DEFAULT_TIMEOUT = 5.0
T = TypeVar("T")


class FakeTelegram:
    """A Telegram Bot API server on 127.0.0.1, one bot, in a background thread.

        with FakeTelegram(bot_username="selfcog_bot") as tg:
            Application.builder().token(tg.token).base_url(tg.base_url).base_file_url(tg.base_file_url)

    clock gives message dates (seconds since the epoch); pass a fixed one for fixed dates.
    """

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        *,
        bot_username: str = "selfcog_test_bot",
        bot_name: str = "Selfcog Test",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = BotApi(token, bot_username=bot_username, bot_name=bot_name, clock=clock)
        self._server: ApiServer | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeTelegram:
        if self._api.closed:
            raise RuntimeError("a closed FakeTelegram can't start again; make a new one")
        if self._server is None:
            self._server = ApiServer(self._api).start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> FakeTelegram:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeTelegram is not started: use `with FakeTelegram() as tg:` or tg.start()")
        return self._server.port

    @property
    def token(self) -> str:
        return self._api.token

    @property
    def base_url(self) -> str:
        """For ``ApplicationBuilder.base_url``; PTB appends the token."""
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        """For ``ApplicationBuilder.base_file_url``; PTB appends the token."""
        return f"http://127.0.0.1:{self.port}/file/bot"

    @property
    def bot(self) -> dict:
        """The bot's User object, as in "from" of its messages: ``tg.bot["username"]``."""
        return dict(self._api.bot)

    def application_builder(self):
        """PTB's ``Application.builder()`` pointed at this fake: ``tg.application_builder().build()``."""
        from telegram.ext import Application  # only tests that run PTB pay for importing it

        return Application.builder().token(self.token).base_url(self.base_url).base_file_url(self.base_file_url)

    # --- acting as users ---------------------------------------------------------------------

    def send_text(
        self,
        chat_id: int,
        user_id: int,
        text: str,
        *,
        chat_type: str = "private",
        reply_to: int | Injected | None = None,
        username: str | None = None,
        first_name: str | None = None,
        title: str | None = None,
    ) -> Injected:
        """A user writes ``text``; /commands, @mentions and URLs get their entities, as on Telegram.

            tg.send_text(42, 42, "/start")                                        # private chat
            tg.send_text(-100, 42, "@selfcog_test_bot hi", chat_type="group", reply_to=7)
        """
        content = text_content(text)
        return self._user_message(chat_id, user_id, content, chat_type, reply_to, username, first_name, title)

    def send_sticker(
        self,
        chat_id: int,
        user_id: int,
        emoji: str = "👍",
        *,
        data: bytes = b"RIFF-fake-webp",
        chat_type: str = "private",
        reply_to: int | Injected | None = None,
        username: str | None = None,
        first_name: str | None = None,
        title: str | None = None,
    ) -> Injected:
        """A user sends a sticker: ``tg.send_sticker(42, 42, "😂")``."""
        content = sticker_content(self._api, emoji, data)
        return self._user_message(chat_id, user_id, content, chat_type, reply_to, username, first_name, title)

    def send_photo(
        self,
        chat_id: int,
        user_id: int,
        data: bytes = b"\xff\xd8fake-jpeg",
        *,
        caption: str | None = None,
        width: int = 640,
        height: int = 480,
        chat_type: str = "private",
        reply_to: int | Injected | None = None,
        username: str | None = None,
        first_name: str | None = None,
        title: str | None = None,
    ) -> Injected:
        """A user sends a photo the bot can getFile and download: ``tg.send_photo(42, 42, caption="a cat")``."""
        content = photo_content(self._api, data, caption, width, height)
        return self._user_message(chat_id, user_id, content, chat_type, reply_to, username, first_name, title)

    def send_voice(
        self,
        chat_id: int,
        user_id: int,
        data: bytes = b"OggS-fake-opus",
        *,
        duration: int = 1,
        mime_type: str = "audio/ogg",
        chat_type: str = "private",
        reply_to: int | Injected | None = None,
        username: str | None = None,
        first_name: str | None = None,
        title: str | None = None,
    ) -> Injected:
        """A user sends a voice note the bot can getFile and download: ``tg.send_voice(42, 42, b"OggS…")``."""
        content = voice_content(self._api, data, duration, mime_type)
        return self._user_message(chat_id, user_id, content, chat_type, reply_to, username, first_name, title)

    def press_button(self, chat_id: int, user_id: int, message_id: int | Injected, callback_data: str) -> Injected:
        """A user presses an inline button of the bot's message; ValueError if it has no such button.

            press = tg.press_button(42, 42, reply["message_id"], "again")
            await tg.wait_for_async(lambda: tg.callback_answer(press.callback_query_id))
        """
        return press_button(self._api, chat_id, user_id, _message_id(message_id), callback_data)

    def add_chat(self, chat_id: int, *, chat_type: str = "private", title: str | None = None) -> dict:
        """Makes a chat known so the bot may write there first (else "Bad Request: chat not found")."""
        return add_chat(self._api, chat_id, chat_type, title)

    def inject_update(self, kind: str, payload: dict) -> int:
        """Queues any update, for what the helpers above don't build: ``tg.inject_update("edited_message", {...})``."""
        with self._api.lock:
            return self._api.push_update(kind, payload)

    def _user_message(self, chat_id, user_id, content, chat_type, reply_to, username, first_name, title) -> Injected:
        return user_message(
            self._api,
            chat_id,
            user_id,
            content,
            chat_type=chat_type,
            username=username,
            first_name=first_name,
            title=title,
            reply_to=None if reply_to is None else _message_id(reply_to),
        )

    # --- shaping answers ---------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        *,
        retry_after: float | None = None,
        error_code: int | None = None,
        description: str | None = None,
        times: int = 1,
        applied: bool = False,
    ) -> None:
        """The next ``times`` calls of ``method`` fail: with flood control (HTTP 429) or any error.

            tg.fail_next("sendMessage", retry_after=2)   # "Too Many Requests: retry after 2"
            tg.fail_next("sendMessage", error_code=403, description="Forbidden: bot was blocked by the user")
            tg.fail_next("sendMessage", error_code=502, description="Bad Gateway", applied=True)

        applied: the call takes effect and only its answer is the error (a proxy's 502 after
        Telegram had sent the message), so the bot can't tell whether it went through.
        """
        if retry_after is not None:
            error = flood_error(retry_after)
        elif error_code is not None and description:
            error = ApiError(error_code, description)
        else:
            raise ValueError("fail_next needs retry_after=, or error_code= and description=")
        self._api.fail_next(method, error, times, applied)

    # --- observing the bot -------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        """Every request the bot made, in the order answered, getUpdates included.

        When PTB's updater stops, its last long poll is still waiting here and answers 409 to
        nobody once the final getUpdates arrives: Telegram does the same, and it is harmless.
        """
        with self._api.lock:
            return list(self._api.calls)

    def calls_to(self, method: str) -> list[Call]:
        """The calls of one method: ``tg.calls_to("editMessageText")[-1].params["text"]``."""
        with self._api.lock:
            return [call for call in self._api.calls if call.method.lower() == method.lower()]

    @property
    def sent(self) -> list[dict]:
        """Messages the bot sent, in order, each as it was when sent (later edits: ``messages``)."""
        with self._api.lock:
            return copy.deepcopy(self._api.sent)

    def messages(self, chat_id: int) -> list[dict]:
        """The bot's messages in a chat as they are now: edits applied, deleted ones gone."""
        bot_id = self._api.bot["id"]
        return [message for message in self.history(chat_id) if message["from"]["id"] == bot_id]

    def history(self, chat_id: int) -> list[dict]:
        """Every message in a chat as it is now, users' and the bot's, in order."""
        with self._api.lock:
            found = [m for (chat, _), m in self._api.messages.items() if chat == chat_id]
            return copy.deepcopy(sorted(found, key=lambda message: message["message_id"]))

    def message(self, chat_id: int, message_id: int | Injected) -> dict | None:
        """One message as it is now, or None once deleted."""
        with self._api.lock:
            return copy.deepcopy(self._api.messages.get((chat_id, _message_id(message_id))))

    def pending_updates(self) -> int:
        """Updates the bot has not fetched and confirmed yet (0: it has seen everything sent so far)."""
        with self._api.lock:
            return len(self._api.updates)

    def callback_answer(self, callback_query_id: str) -> dict | None:
        """The bot's answerCallbackQuery parameters for a press, or None while it hasn't answered."""
        with self._api.lock:
            return copy.deepcopy(self._api.callback_queries.get(callback_query_id))

    def commands(self, scope: dict | None = None, language_code: str = "") -> list[dict]:
        """The command list the bot set with setMyCommands for a scope (default scope if None)."""
        params = {"scope": scope, "language_code": language_code}
        with self._api.lock:
            return self._api.get_my_commands(params)

    # --- waiting -----------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], T], timeout: float = DEFAULT_TIMEOUT, *, what: str = "") -> T:
        """Blocks until ``predicate()`` is truthy and returns it; wakes on every change, no polling.

            tg.wait_for(lambda: tg.calls_to("answerCallbackQuery"))

        From async code (where the bot's event loop is yours) use ``await tg.wait_for_async(...)``.
        """
        _refuse_inside_event_loop("wait_for")
        deadline = time.monotonic() + timeout
        with self._api.changed:  # the predicate runs under the lock, so it sees a consistent state
            while True:
                result = predicate()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(self._timeout_report(what or "the condition", timeout))
                self._api.changed.wait(remaining)

    def wait_for_message(
        self,
        chat_id: int,
        contains: str | None = None,
        *,
        since: int | Injected | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> dict:
        """Blocks until the bot has a message in the chat (whose text or caption contains ``contains``,
        newer than message ``since``) and returns it as it is at that moment.

            sent = tg.send_text(42, 42, "hi")
            reply = tg.wait_for_message(42, contains="hi", since=sent)
        """
        _refuse_inside_event_loop("wait_for_message")
        after = 0 if since is None else _message_id(since)

        def matching_message() -> dict | None:
            for message in self.messages(chat_id):
                body = message.get("text") or message.get("caption") or ""
                if message["message_id"] > after and (contains is None or contains in body):
                    return message
            return None

        what = f"a bot message in chat {chat_id}" + (f" containing {contains!r}" if contains else "")
        return self.wait_for(matching_message, timeout, what=what)

    async def wait_for_async(
        self, predicate: Callable[[], T], timeout: float = DEFAULT_TIMEOUT, *, what: str = ""
    ) -> T:
        """``wait_for`` for async tests: waits in a worker thread so the bot's event loop keeps running."""
        return await asyncio.to_thread(self.wait_for, predicate, timeout, what=what)

    async def wait_for_message_async(
        self,
        chat_id: int,
        contains: str | None = None,
        *,
        since: int | Injected | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> dict:
        """``wait_for_message`` for async tests: ``reply = await tg.wait_for_message_async(42, "hi")``."""
        return await asyncio.to_thread(self.wait_for_message, chat_id, contains, since=since, timeout=timeout)

    def _timeout_report(self, what: str, timeout: float) -> str:
        calls = [call for call in self._api.calls if call.method.lower() != "getupdates"][-8:]
        lines = [f"  {call.method} -> {call.status} {call.description or ''} {call.params}" for call in calls]
        polled = any(call.method.lower() == "getupdates" for call in self._api.calls)
        hint = "" if polled else " (the bot never called getUpdates: is it polling this fake?)"
        return f"waited {timeout}s for {what}{hint}; the bot's last calls:\n" + ("\n".join(lines) or "  none")


@contextlib.asynccontextmanager
async def polling(application):
    """Runs a PTB Application's polling for the body of the block, as ``run_polling`` would.

        async with polling(tg.application_builder().build()) as application: ...
    """
    async with application:
        await application.start()
        await application.updater.start_polling(poll_interval=0, timeout=1)
        try:
            yield application
        finally:
            await application.updater.stop()
            await application.stop()


def _message_id(message: int | Injected) -> int:
    return message.message_id if isinstance(message, Injected) else int(message)


def _refuse_inside_event_loop(name: str) -> None:
    # Blocking the thread that runs an event loop would freeze the bot we are waiting for.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"{name} would block the running event loop (and the bot on it); use `await tg.{name}_async(...)`"
    )
