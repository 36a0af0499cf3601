"""A loopback Telegram Bot API that a real python-telegram-bot Application talks to, for tests.

    from telegram_fake import FakeTelegram

    with FakeTelegram() as tg:
        application = tg.application_builder().build()
        ...
        tg.send_text(42, 42, "hello")
        reply = await tg.wait_for_message_async(42, contains="hello")

The pytest fixture ``fake_telegram`` lives in ``telegram_fake.plugin``; ``polling(application)``
runs a bot's polling for the body of a block; the fake's own tests are in test_fake_telegram_server.py. Modules: fake (the API
tests use), bot_api (Telegram's state and methods), users (updates users cause), server (HTTP),
markup (HTML parsing with Telegram's errors).
"""

from .bot_api import MAX_TEXT_LENGTH, NOT_MODIFIED, Call
from .fake import DEFAULT_TOKEN, FakeTelegram, polling
from .markup import EntityParseError, parse_formatted
from .users import Injected

__all__ = [
    "DEFAULT_TOKEN",
    "MAX_TEXT_LENGTH",
    "NOT_MODIFIED",
    "Call",
    "EntityParseError",
    "FakeTelegram",
    "Injected",
    "parse_formatted",
    "polling",
]
