"""The pytest fixture: a started FakeTelegram per test, closed after it.

    # in a test module, or once for all in conftest.py: pytest_plugins = ["telegram_fake.plugin"]
    from telegram_fake.plugin import fake_telegram

    def test_start(fake_telegram):
        fake_telegram.send_text(42, 42, "/start")
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .fake import FakeTelegram


@pytest.fixture
def fake_telegram() -> Iterator[FakeTelegram]:
    """A running FakeTelegram; its ``base_url`` and ``token`` go to ``Application.builder()``."""
    with FakeTelegram() as tg:
        yield tg
