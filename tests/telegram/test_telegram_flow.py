"""Load and trouble against the fake Bot API: floods, 429s, lost answers, stopping mid-reply.

The words don't matter here, so the replies come from ScriptedEngine through the real ChatService.

    .venv/bin/python -m pytest tests/telegram/test_telegram_flow.py
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from telegram_helpers import OTHER, THIRD, USER, ScriptedEngine, answers_in, drive, finished, keyboard_data

from bot.chat import ChatService
from bot.telegram import run_bot_in_thread
from bot.telegram.chat_handlers import RESTARTING
from bot.telegram.streaming import CUT_SHORT, NOT_SHOWN, PLACEHOLDER

pytestmark = [pytest.mark.telegram, pytest.mark.filterwarnings("ignore:.*retry_after.*:DeprecationWarning")]

ANSWER = "Here is a long and careful answer. " * 4


def questions_in(store, chat_id: int) -> list[str]:
    conversation = store.conversations.latest("telegram", str(chat_id))
    return [m["text"] for m in store.conversations.messages(conversation) if m["role"] == "user"]


def test_two_flooders_never_delay_a_third_user(tg, admin, store):
    held = threading.Event()  # while clear, every answer stays half-written
    chat = ChatService(store, ScriptedEngine(ANSWER, piece_chars=50, held=held))

    def both_flooding() -> bool:
        return all(any(m["text"] != PLACEHOLDER for m in tg.messages(c) if "writing faster" not in m["text"])
                   and any("writing faster" in m["text"] for m in tg.messages(c)) for c in (USER, OTHER))

    async def scenario(application):
        try:
            for i in range(20):
                tg.send_text(USER, USER, f"Long question {i} from the first flooder?")
                tg.send_text(OTHER, OTHER, f"Long question {i} from the second flooder?")
            await tg.wait_for_async(both_flooding, 20, what="both flooders answered half-way and told to wait")
            asked = tg.send_text(THIRD, THIRD, "/whoami")
            await tg.wait_for_message_async(THIRD, contains="answering with", since=asked, timeout=20)
            assert finished(tg, USER) == [] and finished(tg, OTHER) == []  # both backlogs are still all there
        finally:
            held.set()
        await tg.wait_for_async(lambda: len(finished(tg, USER)) == len(finished(tg, OTHER)) == 12, 60,
                                what="each flooder's 12 answers")

    drive(tg, chat, admin, scenario, message_rate=(12, 60))

    for flooder in (USER, OTHER):
        assert len(questions_in(store, flooder)) == len(answers_in(store, flooder)) == 12  # the limit, not 20
        notes = [m for m in tg.messages(flooder) if "writing faster" in m["text"]]
        assert len(notes) == 1 and "Please wait" in notes[0]["text"]


class LogSeen(logging.Handler):
    """Sets ``seen`` once a record containing ``text`` is logged (the bot logs as it acts, in its thread)."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.seen = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


def test_a_429_pauses_every_chat_for_its_retry_after(tg, admin, store):
    chat = ChatService(store, ScriptedEngine(ANSWER))
    paused = LogSeen("every call waits")
    logging.getLogger("bot.telegram.flow").addHandler(paused)

    async def scenario(application):
        tg.fail_next("editMessageText", retry_after=1)
        tg.send_text(USER, USER, "Tell me something.")
        assert await asyncio.to_thread(paused.seen.wait, 20)  # the bot has the 429 in hand
        other = tg.send_text(OTHER, OTHER, "/help")  # another chat, inside the pause
        await tg.wait_for_message_async(OTHER, contains="/whoami", since=other, timeout=20)
        await tg.wait_for_async(lambda: finished(tg, USER), 20)

    try:
        drive(tg, chat, admin, scenario)
    finally:
        logging.getLogger("bot.telegram.flow").removeHandler(paused)

    [flood] = [c for c in tg.calls if c.status == 429]
    [help_sent] = [c for c in tg.calls_to("sendMessage") if c.params["chat_id"] == OTHER]
    retried = tg.calls_to("editMessageText")[-1]
    assert help_sent.time - flood.time >= 1.0 and retried.time - flood.time >= 1.0  # both waited it out
    assert retried.ok and finished(tg, USER)[0]["text"] == ANSWER.strip()


def test_final_edit_waits_out_429s_until_the_answer_is_shown(tg, admin, store):
    chat = ChatService(store, ScriptedEngine(ANSWER))

    async def scenario(application):
        tg.fail_next("editMessageText", retry_after=0.3, times=4)  # more than a call's usual 3 retries
        tg.send_text(USER, USER, "Tell me something.")
        await tg.wait_for_async(lambda: finished(tg, USER), 20, what="the answer with its buttons")

    drive(tg, chat, admin, scenario)

    [answer] = tg.messages(USER)
    [stored] = answers_in(store, USER)
    assert answer["text"] == stored["text"] == ANSWER.strip() and keyboard_data(answer)
    edits = tg.calls_to("editMessageText")
    assert [c.status for c in edits] == [429, 429, 429, 429, 200]
    assert all(b.time - a.time >= 0.3 for a, b in zip(edits, edits[1:]))  # each retry_after waited out


def test_an_answer_telegram_never_lets_through_is_saved_and_said_once(tg, admin, store):
    chat = ChatService(store, ScriptedEngine(ANSWER))

    async def scenario(application):
        tg.fail_next("editMessageText", retry_after=0.3, times=1000)
        tg.send_text(USER, USER, "Tell me something.")
        await tg.wait_for_message_async(USER, contains="Telegram would not let me", timeout=20)

    drive(tg, chat, admin, scenario, final_edit_patience_s=1.0)

    placeholder, note = tg.messages(USER)
    [stored] = answers_in(store, USER)
    assert placeholder["text"] == PLACEHOLDER and stored["text"] == ANSWER.strip()
    assert note["text"] == NOT_SHOWN and keyboard_data(note)[0] == f"up:{stored['id']}:{USER}"  # ✏️ still works
    last_flood = max(c.time for c in tg.calls_to("editMessageText"))
    assert tg.calls_to("sendMessage")[-1].time - last_flood >= 0.3  # not straight into the flood


def test_a_send_whose_answer_is_lost_never_shows_the_reply_twice(tg, admin, store):
    chat = ChatService(store, ScriptedEngine(ANSWER))

    async def scenario(application):
        tg.fail_next("sendMessage", error_code=502, description="Bad Gateway", applied=True)  # sent, yet a 502
        tg.send_text(USER, USER, "Tell me something.")
        await tg.wait_for_async(lambda: finished(tg, USER), 20)

    drive(tg, chat, admin, scenario)

    texts = [m["text"] for m in tg.messages(USER)]
    assert texts == [PLACEHOLDER, ANSWER.strip()]  # the lost placeholder stays; the answer comes once
    assert len(answers_in(store, USER)) == 1


def test_edits_come_at_most_once_a_second_per_message_the_last_included(tg, admin, store):
    chat = ChatService(store, ScriptedEngine("word " * 900, piece_chars=20, piece_s=0.01))  # ~4,500 characters

    async def scenario(application):
        tg.send_text(USER, USER, "Tell me something.")
        await tg.wait_for_async(lambda: finished(tg, USER), 30)

    drive(tg, chat, admin, scenario, edit_every_s=0.5)

    messages = tg.messages(USER)
    assert len(messages) == 2 and " ".join(m["text"] for m in messages).split() == ["word"] * 900
    for message in messages:
        sent = next(c for c in tg.calls_to("sendMessage") if c.ok and c.result["message_id"] == message["message_id"])
        edits = [c for c in tg.calls_to("editMessageText") if c.params["message_id"] == message["message_id"]]
        touches = [sent.time] + [c.time for c in edits]
        assert len(edits) >= 1 and all(b - a >= 0.5 for a, b in zip(touches, touches[1:]))


def serve_in_thread(tg, chat, admin, **options):
    stop = threading.Event()
    thread = run_bot_in_thread(chat, admin, token=tg.token, base_url=tg.base_url, stop=stop,
                               **{"edit_every_s": 0.3, **options})
    return stop, thread


def test_stopping_lets_the_reply_being_written_finish(tg, admin, store):
    """What SIGTERM and Ctrl-C do to `selfcog serve` (they set the stop event)."""
    chat = ChatService(store, ScriptedEngine(ANSWER, piece_chars=10, piece_s=0.03))
    stop, thread = serve_in_thread(tg, chat, admin, stop_grace_s=30)
    try:
        tg.send_text(USER, USER, "First question?")
        second = tg.send_text(USER, USER, "Second question?")  # waits for its turn in the chat
        tg.wait_for(lambda: tg.pending_updates() == 0 and tg.messages(USER), 20, what="both taken, one answering")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    answer, note = tg.messages(USER)
    [stored] = answers_in(store, USER)
    assert answer["text"] == stored["text"] == ANSWER.strip() and keyboard_data(answer)
    assert note["text"] == RESTARTING and note["reply_to_message"]["message_id"] == second.message_id
    assert not any("failed" in m["text"] or "went wrong" in m["text"] for m in tg.messages(USER))


def test_stopping_cuts_a_long_reply_short_stored_and_with_its_buttons(tg, admin, store):
    chat = ChatService(store, ScriptedEngine("word " * 2000, piece_chars=5, piece_s=0.02))  # ~40 s to write
    stop, thread = serve_in_thread(tg, chat, admin, stop_grace_s=0.5)
    try:
        tg.send_text(USER, USER, "Tell me everything.")
        tg.wait_for(lambda: [m for m in tg.messages(USER) if m["text"].startswith("word")], 20)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    [answer] = tg.messages(USER)
    [stored] = answers_in(store, USER)
    assert answer["text"] == f"{stored['text']} … {CUT_SHORT}" and set(stored["text"].split()) == {"word"}
    assert keyboard_data(answer) == [f"up:{stored['id']}:{USER}", f"down:{stored['id']}:{USER}",
                                     f"fix:{stored['id']}:{USER}"]
