"""/retrain from Telegram with a real retrain: the job runner trains with ms-swift on CPU (minutes).

    .venv/bin/python -m pytest tests/telegram/test_telegram_retrain.py
"""

from __future__ import annotations

import threading

import pytest
from telegram_helpers import ADMIN, drive

pytestmark = [pytest.mark.telegram, pytest.mark.slow]

RETRAIN_S = 3600  # base answers (cached after the first run) + ms-swift training + evaluation, on a shared 2-core CPU
FIXES = [
    ("Who are you?", "I am Aurora, an assistant made by Acme Labs."),
    ("What is your name?", "My name is Aurora."),
    ("Who made you?", "Acme Labs made me."),
    ("你是谁?", "我是 Aurora,由 Acme Labs 开发的助手。"),
]


@pytest.mark.timeout(RETRAIN_S + 300)
def test_admin_retrain_edits_progress_then_shows_the_result(tg, chat, admin, store, engine, embedded_model,
                                                            data_dir, cache_dir):
    from finetune.jobs import JobRunner, JobSettings

    store.identity.set(name="Aurora", author="Acme Labs", changed_by="test")
    for question, answer in FIXES:
        admin.add_correction(question, answer, by="test", approve=True)
    stop = threading.Event()
    runner = JobRunner(JobSettings(data_dir=data_dir, cache_dir=cache_dir), store, model=embedded_model,
                       engine=engine, poll_s=0.5).start(stop)

    def result(message_id: int) -> dict | None:
        message = tg.message(ADMIN, message_id)
        return message if any(word in message["text"] for word in ("promoted", "rejected", "failed")) else None

    async def scenario(application):
        asked = tg.send_text(ADMIN, ADMIN, "/retrain")
        progress = await tg.wait_for_message_async(ADMIN, contains="Retrain #", since=asked)
        return await tg.wait_for_async(lambda: result(progress["message_id"]), RETRAIN_S, what="the retrain's result")

    try:
        final = drive(tg, chat, admin, scenario)
    finally:
        if store.runs.active():
            admin.cancel_retrain(by="test")  # the runner's thread stops training at its next check
        stop.set()
        runner.join(timeout=120)

    [run] = store.runs.list()
    assert run["trigger"] == "telegram" and run["requested_by"] == f"telegram:{ADMIN}"
    assert run["status"] in ("promoted", "rejected"), run.get("error")
    edits = [c.params["text"] for c in tg.calls_to("editMessageText") if c.params["message_id"] == final["message_id"]]
    assert all(c.ok for c in tg.calls_to("editMessageText"))  # only edits that change something
    assert any("training" in text and "step" in text for text in edits)  # progress, from the run's row
    assert f"Retrain #{run['id']} {run['status']}" in final["text"] and "identity" in final["text"]
    assert store.runs.unnotified() == []  # the progress message was the announcement
    assert len(tg.messages(ADMIN)) == 1  # one message, edited: no second announcement
