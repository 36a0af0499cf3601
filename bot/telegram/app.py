"""The Application: built and wired in one place, polled in a thread of ``selfcog serve``.

    application = build_application(chat, admin, token="123:abc", admin_ids={42})
    async with running(application):          # long polling for the body of the block
        ...
    run_bot_in_thread(chat, admin, token=..., admin_ids={42}, stop=stop_event)   # what `selfcog serve` calls

Updates are handled concurrently (a long answer in one chat never holds up another chat). Every
request goes through ``PatientRateLimiter``: AIORateLimiter's flood limits, waiting out Telegram's
``retry_after`` on HTTP 429, plus a few retries with backoff for requests lost on the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from telegram import BotCommand, BotCommandScopeChat, Update
from telegram.error import BadRequest, InvalidToken, NetworkError, TelegramError, TimedOut
from telegram.ext import AIORateLimiter, Application, CallbackQueryHandler, CommandHandler, ContextTypes, MessageHandler, filters

from bot.admin import Admin
from bot.chat import ChatService
from bot.telegram import admin_handlers as admin_
from bot.telegram import chat_handlers as chat_
from bot.telegram.services import KEY, Services, UserLimits
from bot.telegram.text import send

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.telegram.org/bot"


class PatientRateLimiter(AIORateLimiter):
    """AIORateLimiter (flood limits; a 429 pauses every request for ``retry_after``, then retries) that
    also retries requests lost on the network, with backoff. Telegram's refusals (BadRequest...) are
    not retried, nor a send that timed out: it may have arrived, and twice would show twice."""

    def __init__(self, *, max_retries: int = 3, network_retries: int = 3, backoff_s: float = 0.5, **kwargs):
        super().__init__(max_retries=max_retries, **kwargs)
        self.network_retries = network_retries
        self.backoff_s = backoff_s

    async def process_request(self, callback, args, kwargs, endpoint, data, rate_limit_args):
        attempt = 0
        while True:
            try:
                return await super().process_request(callback, args, kwargs, endpoint, data, rate_limit_args)
            except BadRequest:
                raise
            except NetworkError as e:
                posts = endpoint.startswith(("send", "forward", "copy")) and endpoint != "sendChatAction"
                if attempt >= self.network_retries or (isinstance(e, TimedOut) and posts):
                    raise
                delay = self.backoff_s * 2**attempt
                log.warning("Telegram %s failed on the network (%s); retrying in %.1f s", endpoint, e, delay)
                await asyncio.sleep(delay)
                attempt += 1


def build_application(chat: ChatService, admin: Admin, *, token: str, base_url: str | None = None,
                      admin_ids=frozenset(), concurrency: int = 16, max_retries: int = 3,
                      message_rate: tuple[float, float] = (12, 60), correction_rate: tuple[float, float] = (6, 60),
                      **timing) -> Application:
    """The bot, ready for ``running()``. base_url: another Bot API server ("http://host:port/bot").

    admin_ids: Telegram user ids allowed admin commands (empty: nobody). message_rate and
    correction_rate: (count, seconds) per user. timing: Services' edit_every_s, group_edit_every_s,
    progress_every_s, announce_every_s (tests shorten them)."""
    builder = (Application.builder().token(token)
               .rate_limiter(PatientRateLimiter(max_retries=max_retries))
               .concurrent_updates(concurrency)
               .connect_timeout(10).read_timeout(20).write_timeout(20).pool_timeout(10))
    if base_url:
        api_url = base_url.rstrip("/")
        api_url = api_url if api_url.endswith("/bot") or "{token}" in api_url else api_url + "/bot"
        builder = builder.base_url(api_url).base_file_url(api_url[: -len("/bot")] + "/file/bot")
    application = builder.build()
    application.bot_data[KEY] = Services(chat, admin, frozenset(int(i) for i in admin_ids),
                                         messages=UserLimits(*message_rate), corrections=UserLimits(*correction_rate),
                                         **timing)
    add_handlers(application)
    return application


def add_handlers(application: Application) -> None:
    """Every handler, in one place; the first that matches an update handles it."""
    new = filters.UpdateType.MESSAGE  # not edits of old messages
    application.add_handler(CommandHandler("start", chat_.start, filters=new))
    application.add_handler(CommandHandler("help", chat_.help_command, filters=new))
    application.add_handler(CommandHandler("reset", chat_.reset, filters=new))
    application.add_handler(CommandHandler("whoami", chat_.whoami, filters=new))
    application.add_handler(CommandHandler("correct", chat_.correct, filters=new))

    application.add_handler(CommandHandler("pending", admin_.pending, filters=new))
    application.add_handler(CommandHandler("retrain", admin_.retrain, filters=new))
    application.add_handler(CommandHandler("cancel", admin_.cancel, filters=new))
    application.add_handler(CommandHandler("status", admin_.status, filters=new))
    application.add_handler(CommandHandler("adapters", admin_.adapters, filters=new))
    application.add_handler(CommandHandler("activate", admin_.activate, filters=new))
    application.add_handler(CommandHandler("rollback", admin_.rollback, filters=new))

    application.add_handler(CallbackQueryHandler(chat_.on_answer_button, pattern=chat_.RATE_PATTERN))
    application.add_handler(CallbackQueryHandler(admin_.on_review, pattern=admin_.REVIEW_PATTERN))
    application.add_handler(CallbackQueryHandler(chat_.stale_button))

    application.add_handler(MessageHandler(new & filters.COMMAND, chat_.unknown_command))
    application.add_handler(MessageHandler(new & filters.TEXT, chat_.on_text))
    application.add_handler(MessageHandler(new & ~filters.TEXT & ~filters.StatusUpdate.ALL, chat_.on_media))
    application.add_error_handler(on_error)


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Logs the error with its traceback, then tells the user something went wrong."""
    what = f"update {update.update_id}" if isinstance(update, Update) else repr(update)[:200]
    log.error("error while handling %s", what, exc_info=context.error)
    if not isinstance(update, Update):
        return
    try:
        if update.callback_query:
            await update.callback_query.answer("Sorry, something went wrong. Please try again.")
        elif update.effective_chat:
            await send(context.bot, update.effective_chat.id,
                       "Sorry, something went wrong on my side. Please try again in a moment.")
    except TelegramError as e:
        log.warning("could not tell the user about the error: %s", e)


async def set_commands(application: Application) -> None:
    """The command menu: the public commands for everyone, plus the admin ones in admins' chats."""
    public = [BotCommand(name, what) for name, what in chat_.PUBLIC_COMMANDS]
    everything = public + [BotCommand(name, what) for name, what in admin_.ADMIN_COMMANDS]
    try:
        await application.bot.set_my_commands(public)
    except TelegramError as e:
        log.warning("could not set the bot's command menu: %s", e)
    for admin_id in application.bot_data[KEY].admin_ids:
        try:
            await application.bot.set_my_commands(everything, scope=BotCommandScopeChat(admin_id))
        except TelegramError as e:  # the admin hasn't started a chat with the bot yet
            log.info("no admin command menu for %s yet: %s", admin_id, e)


@contextlib.asynccontextmanager
async def running(application: Application, *, poll_timeout: int = 10):
    """Long-polls Telegram for the body of the block, and tells admins about finished retrains."""
    bot: Services = application.bot_data[KEY]
    async with application:
        await set_commands(application)
        await application.start()
        await application.updater.start_polling(poll_interval=0, timeout=poll_timeout,
                                                allowed_updates=[Update.MESSAGE, Update.CALLBACK_QUERY])
        bot.spawn(admin_.announce_finished_runs(application.bot, bot))
        try:
            yield application
        finally:
            await bot.close()
            if application.updater.running:
                await application.updater.stop()
            if application.running:
                await application.stop()
            bot.generation.shutdown(wait=False, cancel_futures=True)


def run_bot_in_thread(chat: ChatService, admin: Admin, *, token: str, base_url: str | None = None,
                      admin_ids=frozenset(), stop: threading.Event, **options) -> threading.Thread:
    """`selfcog serve`'s bot: its own thread and event loop, polling until ``stop`` is set."""

    def main() -> None:
        try:
            asyncio.run(_serve_until(stop, chat, admin, token=token, base_url=base_url, admin_ids=admin_ids,
                                     **options))
        except Exception:
            log.exception("the Telegram bot stopped")

    thread = threading.Thread(target=main, name="telegram-bot", daemon=True)
    thread.start()
    return thread


async def _serve_until(stop: threading.Event, chat: ChatService, admin: Admin, **options) -> None:
    """Polls until stop is set; while Telegram can't be reached at start, tries again with backoff."""
    delay = 1.0
    while not stop.is_set():
        application = build_application(chat, admin, **options)
        try:
            async with running(application):
                log.info("Telegram bot @%s is running", application.bot.username)
                while not stop.is_set():
                    await asyncio.sleep(0.5)
            return
        except InvalidToken:
            log.error("Telegram refused the bot token (TELEGRAM_BOT_TOKEN): the bot is off")
            return
        except NetworkError as e:  # no connection at start; polling itself rides out later outages
            log.warning("could not reach Telegram (%s); trying again in %.0f s", e, delay)
            await asyncio.to_thread(stop.wait, delay)
            delay = min(delay * 2, 60.0)
