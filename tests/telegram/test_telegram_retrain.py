"""/retrain from Telegram: the real job runner builds the dataset, evaluates, gates (the default gate)
and activates, while the bot edits one message with the progress until the result. Only the training
is replayed from the suite's one real retrain (the `job_runner` and `replay` fixtures in
tests/conftest.py), so the adapter that goes live is that retrain's (its evaluation comes from the cache).

    .venv/bin/python -m pytest tests/telegram/test_telegram_retrain.py
"""

from __future__ import annotations

import asyncio

import pytest
from telegram_helpers import ADMIN, drive

from tests.scenario import FIVE_CORRECTIONS, PROFILE

# Run alone, it first waits for the shared real retrain (`retrained`): ~10 minutes on two cores.
pytestmark = [pytest.mark.telegram, pytest.mark.slow, pytest.mark.timeout(3600)]

RETRAIN_S = 1800  # seconds when the evaluation is cached; minutes if it is not, on a shared CPU


def test_admin_retrain_edits_progress_then_shows_the_result(tg, chat, admin, store, job_runner, replay):
    store.identity.set(name=PROFILE.name, author=PROFILE.author, changed_by="test")
    for row in FIVE_CORRECTIONS:
        admin.add_correction(row["question"], row["answer"], by="test", approve=True)

    def text_of(message_id: int, *words: str) -> dict | None:
        message = tg.message(ADMIN, message_id)
        return message if all(word in message["text"] for word in words) else None

    def finished(message_id: int) -> dict | None:
        message = tg.message(ADMIN, message_id)
        return message if any(word in message["text"] for word in ("promoted", "rejected", "failed")) else None

    async def scenario(application):
        asked = tg.send_text(ADMIN, ADMIN, "/retrain")
        progress = await tg.wait_for_message_async(ADMIN, contains="Retrain #", since=asked)
        await tg.wait_for_async(lambda: text_of(progress["message_id"], "training", "step 1/"), RETRAIN_S,
                                what="the progress at step 1, where the worker holds")
        await asyncio.to_thread(replay.release)
        final = await tg.wait_for_async(lambda: finished(progress["message_id"]), RETRAIN_S, what="the retrain's result")
        # the bot marks the run announced right after that edit, while the application still runs
        await tg.wait_for_async(lambda: not store.runs.unnotified(), 30, what="the run marked announced")
        announcements = len(tg.messages(ADMIN))
        asked = tg.send_text(ADMIN, ADMIN, "Who are you?")  # the new adapter answers, without a restart
        await tg.wait_for_message_async(ADMIN, contains=PROFILE.name, since=asked, timeout=300)
        return final, announcements

    final, announcements = drive(tg, chat, admin, scenario)

    [run] = store.runs.list()
    assert run["trigger"] == "telegram" and run["requested_by"] == f"telegram:{ADMIN}"
    assert run["status"] == "promoted", run.get("error")
    assert all(c.ok for c in tg.calls_to("editMessageText"))  # only edits that change something
    assert f"Retrain #{run['id']} promoted" in final["text"] and "identity" in final["text"]
    assert store.runs.unnotified() == []  # the progress message was the announcement
    assert announcements == 1  # one message, edited: no second announcement
