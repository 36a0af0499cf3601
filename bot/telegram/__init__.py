"""The Telegram face of the bot (python-telegram-bot 22): chat, corrections, admin commands.

    from bot.telegram import build_application, running, run_bot_in_thread

    application = build_application(chat, admin, token=TOKEN, admin_ids={42})
    async with running(application):     # polls until the block ends
        ...

Modules: app (the Application, its wiring, polling, stopping), flow (per-chat order, per-user limits,
Telegram's flood control), chat_handlers (chat, 👍/👎/✏️, /correct...),
admin_handlers (/pending, /retrain and its progress, /adapters...), streaming (a reply edited as it
grows), text (splitting at 4096, HTML escaping with a plain-text fallback), services (what the
handlers share). Everything the web page needs too lives in bot.chat and bot.admin, not here.
"""

from bot.telegram.app import build_application, run_bot_in_thread, running
from bot.telegram.services import STOP_GRACE_S

__all__ = ["STOP_GRACE_S", "build_application", "run_bot_in_thread", "running"]
