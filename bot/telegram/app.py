"""The Application: built and wired in one place, polled in a thread of ``selfcog serve``.

    application = build_application(chat, admin, token="123:abc", admin_ids={42})
    async with running(application):          # long polling for the body of the block
        ...
    run_bot_in_thread(chat, admin, token=..., admin_ids={42}, stop=stop_event)   # what `selfcog serve` calls

Updates go through ``ChatOrderedUpdates`` (one chat's messages in order, chats side by side, the
per-user limit applied at the door) and every call to Telegram through ``PatientRateLimiter`` (flood
limits; a 429 pauses every call). Stopping is graceful, for Ctrl-C and SIGTERM alike: no new
updates, the replies being written finish (or are cut short after ``stop_grace_s``, stored and shown
with their buttons), and messages still queued are answered with "please send it again".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from telegram import BotCommand, BotCommandScopeChat, Update
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import (Application, CallbackQueryHandler, CommandHandler, ContextTypes, MessageHandler, TypeHandler,
                          filters)

from bot.admin import Admin
from bot.chat import ChatService
from bot.errors import UserError
from bot.telegram import admin_handlers as admin_
from bot.telegram import chat_handlers as chat_
from bot.telegram.flow import ChatOrderedUpdates, PatientRateLimiter, UserLimits
from bot.telegram.services import KEY, Services, services
from bot.telegram.text import escape, send

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.telegram.org/bot"


def build_application(chat: ChatService, admin: Admin, *, token: str, base_url: str | None = None,
                      admin_ids=frozenset(), concurrency: int = 16, max_retries: int = 3,
                      message_rate: tuple[float, float] = (12, 60), correction_rate: tuple[float, float] = (6, 60),
                      **timing) -> Application:
    """The bot, ready for ``running()``. base_url: another Bot API server ("http://host:port/bot").

    admin_ids: Telegram user ids allowed admin commands (empty: nobody). message_rate and
    correction_rate: (count, seconds) per user. concurrency: handlers running at once (updates waiting
    for their chat's turn don't count). timing: Services' edit_every_s, group_edit_every_s,
    progress_every_s, announce_every_s, final_edit_patience_s, stop_grace_s (tests shorten them)."""
    bot = Services(chat, admin, frozenset(int(i) for i in admin_ids), messages=UserLimits(*message_rate),
                   corrections=UserLimits(*correction_rate), **timing,
                   generation=ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="telegram-reply"))
    updates = ChatOrderedUpdates(concurrency, admit=functools.partial(chat_.admit, bot),
                                 turned_away=chat_.turned_away)
    builder = (Application.builder().token(token)
               .rate_limiter(PatientRateLimiter(max_retries=max_retries))
               .concurrent_updates(updates)
               .connect_timeout(10).read_timeout(20).write_timeout(20).pool_timeout(10))
    if base_url:
        api_url = base_url.rstrip("/")
        api_url = api_url if api_url.endswith("/bot") or "{token}" in api_url else api_url + "/bot"
        builder = builder.base_url(api_url).base_file_url(api_url[: -len("/bot")] + "/file/bot")
    application = builder.build()
    application.bot_data[KEY] = bot
    add_handlers(application)
    return application


def add_handlers(application: Application) -> None:
    """Every handler, in one place; the first that matches an update handles it."""
    new = filters.UpdateType.MESSAGE  # not edits of old messages
    application.add_handler(TypeHandler(Update, set_missing_menu), group=-1)  # before, and beside, the rest
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

    application.add_handler(CallbackQueryHandler(chat_.on_rate, pattern=chat_.RATE_PATTERN))
    application.add_handler(CallbackQueryHandler(chat_.on_fix, pattern=chat_.FIX_PATTERN))
    application.add_handler(CallbackQueryHandler(admin_.on_review, pattern=admin_.REVIEW_PATTERN))
    application.add_handler(CallbackQueryHandler(chat_.stale_button))

    application.add_handler(MessageHandler(new & filters.COMMAND, chat_.unknown_command))
    application.add_handler(MessageHandler(new & filters.TEXT, chat_.on_text))
    application.add_handler(MessageHandler(new & ~filters.TEXT & ~filters.StatusUpdate.ALL, chat_.on_media))
    application.add_error_handler(on_error)


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A UserError (bad input, not saved, a refused action) is told to the user in one line; anything
    else is a bug: logged with its traceback, then the user hears that something went wrong."""
    error = context.error
    what = f"update {update.update_id}" if isinstance(update, Update) else repr(update)[:200]
    if isinstance(error, UserError):
        log.info("told the user about %s: %s", what, error)
        note = str(error)
    else:
        log.error("error while handling %s", what, exc_info=error)
        note = "Sorry, something went wrong on my side. Please try again in a moment."
    if not isinstance(update, Update):
        return
    try:
        if update.callback_query:
            try:
                await update.callback_query.answer(note[:200])
                return
            except TelegramError:  # answered already: say it in the chat
                pass
        if update.effective_chat:
            message = update.effective_message
            await send(context.bot, update.effective_chat.id, escape(note),
                       reply_to=message.message_id if message and not update.callback_query else None)
    except TelegramError as e:
        log.warning("could not tell the user about the error: %s", e)


def command_menus() -> tuple[list[BotCommand], list[BotCommand]]:
    """The command menu everyone sees, and the one admins see."""
    public = [BotCommand(name, what) for name, what in chat_.PUBLIC_COMMANDS]
    return public, public + [BotCommand(name, what) for name, what in admin_.ADMIN_COMMANDS]


async def set_commands(application: Application) -> None:
    """The command menu: the public commands for everyone, plus the admin ones in admins' chats.

    Telegram refuses an admin's menu until the admin has written to the bot; ``set_missing_menu``
    sets it on their first message then."""
    bot = services(application)
    public, everything = command_menus()
    try:
        await application.bot.set_my_commands(public)
    except TelegramError as e:
        log.warning("could not set the bot's command menu: %s", e)
    for admin_id in sorted(bot.admin_ids):
        try:
            await application.bot.set_my_commands(everything, scope=BotCommandScopeChat(admin_id))
        except TelegramError as e:  # the admin hasn't started a chat with the bot yet
            log.info("no admin command menu for %s yet (%s): set on their first message", admin_id, e)
            bot.menu_missing.add(admin_id)


async def set_missing_menu(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """An admin whose menu Telegram refused at start writes: their chat exists now, so set it."""
    bot = services(context)
    user = update.effective_user
    if user is None or user.id not in bot.menu_missing:
        return
    bot.menu_missing.discard(user.id)
    try:
        await context.bot.set_my_commands(command_menus()[1], scope=BotCommandScopeChat(user.id))
    except TelegramError as e:
        log.warning("could not set admin %s's command menu: %s", user.id, e)


@contextlib.asynccontextmanager
async def running(application: Application, *, poll_timeout: int = 10):
    """Long-polls Telegram for the body of the block, and tells admins about finished retrains;
    then stops gracefully (see ``stop_gracefully``)."""
    bot = services(application)
    async with application:
        await set_commands(application)
        await application.start()
        await application.updater.start_polling(poll_interval=0, timeout=poll_timeout,
                                                allowed_updates=[Update.MESSAGE, Update.CALLBACK_QUERY])
        bot.spawn(admin_.announce_finished_runs(application.bot, bot))
        try:
            yield application
        finally:
            await stop_gracefully(application)


async def stop_gracefully(application: Application) -> None:
    """Take no new updates; let the replies being written finish for up to ``stop_grace_s``, then cut
    them short (each is stored and shown with its buttons); tell whoever still waited to send again."""
    bot = services(application)
    if application.updater.running:
        await application.updater.stop()  # confirms the updates fetched so far: none comes twice
    application.update_processor.stop_starting()
    await bot.stop_background()
    if application.running:
        stopping = asyncio.ensure_future(application.stop())  # waits for every handler to return
        done, _ = await asyncio.wait({stopping}, timeout=bot.stop_grace_s)
        if not done:
            log.info("replies still being written after %.0f s: cutting them short", bot.stop_grace_s)
            bot.cut_short.set()
        await stopping
    bot.generation.shutdown(wait=False, cancel_futures=True)


def run_bot_in_thread(chat: ChatService, admin: Admin, *, token: str, base_url: str | None = None,
                      admin_ids=frozenset(), stop: threading.Event, **options) -> threading.Thread:
    """`selfcog serve`'s bot: its own thread and event loop, polling until ``stop`` is set; then it
    stops gracefully (join the thread for up to ``STOP_GRACE_S`` + a few seconds)."""

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
                    await asyncio.sleep(0.2)
            return
        except InvalidToken:
            log.error("Telegram refused the bot token (TELEGRAM_BOT_TOKEN): the bot is off")
            return
        except NetworkError as e:  # no connection at start; polling itself rides out later outages
            log.warning("could not reach Telegram (%s); trying again in %.0f s", e, delay)
            await asyncio.to_thread(stop.wait, delay)
            delay = min(delay * 2, 60.0)
