"""Fixtures for the Telegram bot's tests; the helpers they share are in telegram_helpers.py.

The chat service (`chat`) and the engine come from tests/conftest.py.

No __init__.py here on purpose: tests/ is on sys.path (pyproject's pythonpath), and a regular
package named ``telegram`` there would hide python-telegram-bot itself.
"""

from __future__ import annotations

import pytest
from telegram_fake.plugin import fake_telegram  # noqa: F401 (the fixture)

from bot.admin import Admin


@pytest.fixture
def tg(fake_telegram):  # noqa: F811
    return fake_telegram


@pytest.fixture
def admin(store):
    return Admin(store)
