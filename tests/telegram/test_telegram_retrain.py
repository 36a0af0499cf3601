"""/retrain from Telegram with a real retrain: the job runner trains with ms-swift on CPU (minutes,
on the quick recipe of the `job_runner` fixture in tests/conftest.py).

    .venv/bin/python -m pytest tests/telegram/test_telegram_retrain.py
"""

from __future__ import annotations

import pytest
from telegram_helpers import ADMIN, drive

pytestmark = [pytest.mark.telegram, pytest.mark.slow]

RETRAIN_S = 2400  # base answers (cached after the first run) + ms-swift training + evaluation: ~6 min alone on 2 cores
FIXES = [
    ("Who are you?", "I am Aurora, an assistant made by Acme Labs."),
    ("What is your name?", "My name is Aurora."),
    ("Who made you?", "Acme Labs made me."),
    ("你是谁?", "我是 Aurora,由 Acme Labs 开发的助手。"),
]


@pytest.mark.timeout(RETRAIN_S + 300)
def test_admin_retrain_edits_progress_then_shows_the_result(tg, chat, admin, store, job_runner):
    store.identity.set(name="Aurora", author="Acme Labs", changed_by="test")
    for question, answer in FIXES:
        admin.add_correction(question, answer, by="test", approve=True)

    def result(message_id: int) -> dict | None:
        message = tg.message(ADMIN, message_id)
        return message if any(word in message["text"] for word in ("promoted", "rejected", "failed")) else None

    async def scenario(application):
        asked = tg.send_text(ADMIN, ADMIN, "/retrain")
        progress = await tg.wait_for_message_async(ADMIN, contains="Retrain #", since=asked)
        final = await tg.wait_for_async(lambda: result(progress["message_id"]), RETRAIN_S, what="the retrain's result")
        # the bot marks the run announced right after that edit, while the application still runs
        await tg.wait_for_async(lambda: not store.runs.unnotified(), 30, what="the run marked announced")
        return final

    final = drive(tg, chat, admin, scenario)

    [run] = store.runs.list()
    assert run["trigger"] == "telegram" and run["requested_by"] == f"telegram:{ADMIN}"
    assert run["status"] in ("promoted", "rejected"), run.get("error")
    edits = [c.params["text"] for c in tg.calls_to("editMessageText") if c.params["message_id"] == final["message_id"]]
    assert all(c.ok for c in tg.calls_to("editMessageText"))  # only edits that change something
    assert any("training" in text and "step" in text for text in edits)  # progress, from the run's row
    assert f"Retrain #{run['id']} {run['status']}" in final["text"] and "identity" in final["text"]
    assert store.runs.unnotified() == []  # the progress message was the announcement
    assert len(tg.messages(ADMIN)) == 1  # one message, edited: no second announcement
