"""The Telegram bot end to end: the real PTB Application polling the loopback fake Bot API, the real model.

    .venv/bin/python -m pytest tests/telegram -m "not slow"
"""

from __future__ import annotations

import logging
import threading

import pytest
from telegram_helpers import ADMIN, GROUP, OTHER, USER, ScriptedEngine, drive

from bot.chat import ChatService
from bot.telegram import run_bot_in_thread
from bot.telegram.text import MAX_MESSAGE_LENGTH, send

pytestmark = [pytest.mark.telegram, pytest.mark.filterwarnings("ignore:.*retry_after.*:DeprecationWarning")]

GENERATION_S = 120  # waiting for the model on a busy 2-core CPU


def keyboard_data(message: dict) -> list[str]:
    return [b["callback_data"] for row in message.get("reply_markup", {}).get("inline_keyboard", []) for b in row]


def answers_in(store, chat_id: int) -> list[dict]:
    conversation = store.conversations.latest("telegram", str(chat_id))
    return [m for m in store.conversations.messages(conversation) if m["role"] == "assistant"]


def test_reply_streams_by_editing_one_message(tg, chat, admin, store):
    async def scenario(application):
        tg.send_text(USER, USER, "Tell me about the sea.")
        # Finished = the rating keyboard is under it.
        await tg.wait_for_async(lambda: [m for m in tg.messages(USER) if keyboard_data(m)], GENERATION_S,
                                what="the finished answer")

    drive(tg, chat, admin, scenario)

    [answer] = answers_in(store, USER)
    [sent] = tg.sent
    final = tg.messages(USER)[-1]
    assert final["message_id"] == sent["message_id"] and final["text"] == answer["text"]
    assert keyboard_data(final) == [f"up:{answer['id']}:{USER}", f"down:{answer['id']}:{USER}",
                                    f"fix:{answer['id']}:{USER}"]
    edits = [call.params for call in tg.calls_to("editMessageText")]
    assert edits and all(e["message_id"] == sent["message_id"] for e in edits)
    texts = [sent["text"]] + [e["text"] for e in edits]
    assert len(texts) >= 2 and all(len(a) <= len(b) for a, b in zip(texts, texts[1:]))  # it grew
    assert all(call.ok for call in tg.calls_to("editMessageText"))  # never an identical ("not modified") edit
    assert any(call.params.get("action") == "typing" for call in tg.calls_to("sendChatAction"))


def test_long_reply_is_split_at_newlines_and_escaped(tg, admin, store):
    paragraph = " ".join(["Fish & chips <b>are</b> not *bold* here."] * 12)
    text = "\n".join(f"{i}. {paragraph}" for i in range(18))  # ~9,000 characters of HTML-looking text
    chat = ChatService(store, ScriptedEngine(text))

    async def scenario(application):
        tg.send_text(USER, USER, "Write something long.")
        await tg.wait_for_async(lambda: [m for m in tg.messages(USER) if keyboard_data(m)], 60,
                                what="the last part with the keyboard")

    drive(tg, chat, admin, scenario)

    parts = tg.messages(USER)
    assert len(parts) == 3 and all(len(p["text"]) <= MAX_MESSAGE_LENGTH for p in parts)
    lines = [line for p in parts for line in p["text"].split("\n")]
    assert lines == text.strip().split("\n")  # cut only between lines, nothing lost, nothing escaped twice
    assert [bool(keyboard_data(p)) for p in parts] == [False, False, True]
    assert "<b>are</b>" in parts[0]["text"] and "entities" not in parts[0]  # shown literally, not as bold
    [answer] = answers_in(store, USER)
    assert answer["text"] == text.strip()
    assert all(call.ok for call in tg.calls if call.method != "getUpdates")


def test_correct_button_ends_in_a_pending_correction(tg, chat, admin, store):
    async def scenario(application):
        tg.send_text(USER, USER, "Who are you?")
        answer = await tg.wait_for_async(lambda: next((m for m in tg.messages(USER) if keyboard_data(m)), None),
                                         GENERATION_S)
        fix = next(data for data in keyboard_data(answer) if data.startswith("fix:"))
        press = tg.press_button(USER, USER, answer["message_id"], fix)
        prompt = await tg.wait_for_message_async(USER, contains="What should I have said?")
        assert tg.callback_answer(press.callback_query_id)
        reply = tg.send_text(USER, USER, "I am Aurora, made by Acme Labs.", reply_to=prompt["message_id"])
        await tg.wait_for_message_async(USER, contains="saved your correction", since=reply)

        up = next(data for data in keyboard_data(answer) if data.startswith("up:"))
        first = tg.press_button(USER, USER, answer["message_id"], up)
        await tg.wait_for_async(lambda: tg.callback_answer(first.callback_query_id))
        await tg.wait_for_async(lambda: "✓" in str(tg.message(USER, answer["message_id"])["reply_markup"]))
        again = tg.press_button(USER, USER, answer["message_id"], up)
        return await tg.wait_for_async(lambda: tg.callback_answer(again.callback_query_id))

    already = drive(tg, chat, admin, scenario)

    [stored] = answers_in(store, USER)
    [correction] = store.corrections.list(status="pending")
    assert (correction["question"], correction["wrong_answer"], correction["corrected_answer"]) == (
        "Who are you?", stored["text"], "I am Aurora, made by Acme Labs.")
    assert (correction["channel"], correction["submitter"], correction["message_id"]) == ("telegram", str(USER), stored["id"])
    prompt_call = next(c for c in tg.calls_to("sendMessage") if "What should I have said" in c.params["text"])
    assert prompt_call.params["reply_markup"]["force_reply"] is True
    assert store.conversations.ratings(stored["id"]) == {"up": 1, "down": 0}
    assert "already rated" in already["text"]


def test_admin_approves_a_correction_from_pending(tg, chat, admin, store):
    correction_id, _ = admin.add_correction("Who made you?", "Acme Labs made me.", by="web")

    async def scenario(application):
        asked = tg.send_text(ADMIN, ADMIN, "/pending")
        listed = await tg.wait_for_message_async(ADMIN, contains=f"Correction #{correction_id}", since=asked)
        assert keyboard_data(listed) == [f"approve:{correction_id}", f"reject:{correction_id}"]
        outsider = tg.press_button(ADMIN, USER, listed["message_id"], f"approve:{correction_id}")
        refused = await tg.wait_for_async(lambda: tg.callback_answer(outsider.callback_query_id))
        assert "Only admins" in refused["text"] and store.corrections.get(correction_id)["status"] == "pending"
        press = tg.press_button(ADMIN, ADMIN, listed["message_id"], f"approve:{correction_id}")
        answered = await tg.wait_for_async(lambda: tg.callback_answer(press.callback_query_id))
        assert "Approved" in answered["text"]
        await tg.wait_for_message_async(ADMIN, contains=f"Approved by telegram:{ADMIN}")

    drive(tg, chat, admin, scenario)

    row = store.corrections.get(correction_id)
    assert (row["status"], row["reviewer"]) == ("approved", f"telegram:{ADMIN}")
    assert tg.sent[0]["text"] == "1 correction waiting for review."
    assert "reply_markup" not in tg.messages(ADMIN)[-1]  # reviewed: the buttons are gone


def test_admin_commands_refuse_non_admins(tg, chat, admin, store):
    admin.add_correction("Who made you?", "Acme Labs made me.", by="web", approve=True)

    async def scenario(application):
        for command in ("/retrain", "/pending", "/rollback"):
            sent = tg.send_text(USER, USER, command)
            await tg.wait_for_message_async(USER, contains=f"{command} is for admins only", since=sent)

    drive(tg, chat, admin, scenario)
    assert store.runs.list() == [] and store.corrections.count("approved") == 1


def test_no_admin_ids_means_nobody_is_admin(tg, chat, admin, store):
    async def scenario(application):
        sent = tg.send_text(ADMIN, ADMIN, "/status")
        await tg.wait_for_message_async(ADMIN, contains="/status is for admins only", since=sent)

    drive(tg, chat, admin, scenario, admin_ids=())


def test_flood_control_and_network_errors_are_waited_out(tg, chat, admin):
    async def scenario(application):
        tg.fail_next("sendMessage", retry_after=1)
        sent = tg.send_text(USER, USER, "/start")
        await tg.wait_for_message_async(USER, contains="Ask me anything", since=sent, timeout=10)
        tg.fail_next("sendMessage", error_code=502, description="Bad Gateway")
        sent = tg.send_text(USER, USER, "/help")
        await tg.wait_for_message_async(USER, contains="/reset", since=sent, timeout=10)

    drive(tg, chat, admin, scenario)

    flood, delivered, bad_gateway, after_gateway = tg.calls_to("sendMessage")
    assert (flood.status, delivered.status, bad_gateway.status, after_gateway.status) == (429, 200, 502, 200)
    assert delivered.time - flood.time >= 1.0  # retry_after honoured
    assert [m["text"].count("Ask me anything") for m in tg.sent] == [1, 0]  # each arrived once


def test_in_groups_only_mentions_and_replies_are_answered(tg, chat, admin, store):
    async def scenario(application):
        tg.send_text(GROUP, USER, "What a nice day, everyone.", chat_type="group")
        tg.send_sticker(GROUP, USER, "😂", chat_type="group")
        asked = tg.send_text(GROUP, USER, f"@{tg.bot['username']} What is the capital of France?", chat_type="group")
        answer = await tg.wait_for_async(lambda: next((m for m in tg.messages(GROUP) if keyboard_data(m)), None),
                                         GENERATION_S)
        assert answer["reply_to_message"]["message_id"] == asked.message_id
        up = next(data for data in keyboard_data(answer) if data.startswith("up:"))
        foreign = tg.press_button(GROUP, OTHER, answer["message_id"], up)
        note = await tg.wait_for_async(lambda: tg.callback_answer(foreign.callback_query_id))
        assert "for the person who asked" in note["text"]

    drive(tg, chat, admin, scenario)

    assert len(tg.messages(GROUP)) == 1  # nothing for the chatter or the sticker
    conversation = store.conversations.latest("telegram", str(GROUP))
    questions = [m["text"] for m in store.conversations.messages(conversation) if m["role"] == "user"]
    assert questions == ["What is the capital of France?"]  # the mention is not part of the question
    assert store.conversations.ratings(answers_in(store, GROUP)[0]["id"]) == {"up": 0, "down": 0}


def test_stickers_media_unknown_commands_and_bad_input_get_replies(tg, chat, admin):
    async def scenario(application):
        sticker = tg.send_sticker(USER, USER, "😂")
        await tg.wait_for_message_async(USER, contains="Nice sticker 😂", since=sticker)
        voice = tg.send_voice(USER, USER)
        await tg.wait_for_message_async(USER, contains="only read text", since=voice)
        unknown = tg.send_text(USER, USER, "/frobnicate now")
        await tg.wait_for_message_async(USER, contains="I don't know /frobnicate", since=unknown)
        long = tg.send_text(USER, USER, "a" * 9000)
        await tg.wait_for_message_async(USER, contains="the limit is 8,000", since=long)
        empty = tg.send_text(GROUP, USER, f"@{tg.bot['username']}", chat_type="group")
        await tg.wait_for_message_async(GROUP, contains="The message is empty", since=empty)
        correct = tg.send_text(USER, USER, "/correct I am Aurora.")
        await tg.wait_for_message_async(USER, contains="no answer of mine in this chat", since=correct)

    drive(tg, chat, admin, scenario)


def test_per_user_rate_limit_warns_once(tg, admin, store):
    chat = ChatService(store, ScriptedEngine("Hello there."))

    async def scenario(application):
        tg.send_text(USER, USER, "one")
        await tg.wait_for_message_async(USER, contains="Hello there.")
        second = tg.send_text(USER, USER, "two")
        await tg.wait_for_message_async(USER, contains="writing faster than I can answer", since=second)
        third = tg.send_text(USER, USER, "three")
        other = tg.send_text(OTHER, OTHER, "hi")  # someone else is not limited
        await tg.wait_for_message_async(OTHER, contains="Hello there.", since=other)
        return third

    drive(tg, chat, admin, scenario, message_rate=(1, 60))
    texts = [m["text"] for m in tg.messages(USER)]
    assert texts == ["Hello there.", "You're writing faster than I can answer. Please wait a little, then try again."]


def test_whoami_reset_and_errors_are_reported(tg, chat, admin, store, caplog):
    store.identity.set(name="Aurora", author="Acme Labs", changed_by="test")

    async def scenario(application):
        sent = tg.send_text(USER, USER, "/whoami")
        await tg.wait_for_message_async(USER, contains="I'm Aurora, made by Acme Labs", since=sent)
        sent = tg.send_text(USER, USER, "/reset")
        await tg.wait_for_message_async(USER, contains="new conversation", since=sent)
        chat.status = lambda: 1 / 0  # a bug in a handler
        sent = tg.send_text(USER, USER, "/whoami")
        await tg.wait_for_message_async(USER, contains="something went wrong", since=sent)

    with caplog.at_level(logging.ERROR, logger="bot.telegram.app"):
        drive(tg, chat, admin, scenario)
    assert "answering with the base model" in tg.messages(USER)[0]["text"]
    [error] = [r for r in caplog.records if r.name == "bot.telegram.app"]
    assert error.exc_info and error.exc_info[0] is ZeroDivisionError  # logged with its traceback


def test_finished_retrain_is_announced_to_admins_once(tg, chat, admin, store):
    run = store.runs.request("schedule", "schedule", claim=True)
    store.runs.finish(run["id"], "rejected", error="identity too low",
                      report={"reasons": ["identity under the product prompt 0.50 < 0.90"],
                              "metrics": {"candidate": {"identity_mean": 0.5, "retention": 0.9}}})
    tg.add_chat(ADMIN)

    async def scenario(application):
        from bot.telegram.admin_handlers import announce_once
        from bot.telegram.services import KEY

        await tg.wait_for_message_async(ADMIN, contains=f"Retrain #{run['id']} rejected")
        assert await announce_once(application.bot, application.bot_data[KEY]) == []  # claimed already

    drive(tg, chat, admin, scenario)
    [announcement] = tg.messages(ADMIN)
    assert "identity under the product prompt" in announcement["text"] and "retention 0.90" in announcement["text"]
    assert store.runs.unnotified() == []


def test_html_that_telegram_refuses_goes_as_plain_text(tg, chat, admin):
    async def scenario(application):
        tg.add_chat(USER)
        message = await send(application.bot, USER, "<think>hmm</think> 1 < 2")
        assert message.text == "hmm 1 < 2"

    drive(tg, chat, admin, scenario)
    refused, plain = tg.calls_to("sendMessage")
    assert refused.status == 400 and plain.ok and "parse_mode" not in plain.params


def test_buttons_of_unknown_answers_and_old_formats_get_a_note(tg, chat, admin):
    from telegram import InlineKeyboardButton, InlineKeyboardMarkup

    from bot.telegram.chat_handlers import answer_keyboard

    async def scenario(application):
        tg.add_chat(USER)
        unknown = await application.bot.send_message(USER, "an answer from a lost database",
                                                     reply_markup=answer_keyboard(999, USER))
        old = await application.bot.send_message(USER, "from an older bot", reply_markup=InlineKeyboardMarkup(
            [[InlineKeyboardButton("Like", callback_data="like:3")]]))
        notes = []
        for message_id, data in ((unknown.message_id, f"up:999:{USER}"), (unknown.message_id, f"fix:999:{USER}"),
                                 (old.message_id, "like:3")):
            press = tg.press_button(USER, USER, message_id, data)
            notes.append((await tg.wait_for_async(lambda: tg.callback_answer(press.callback_query_id)))["text"])
        return notes

    notes = drive(tg, chat, admin, scenario)
    assert notes[0] == notes[1] == "I can't find that answer any more. Ask me again to rate or correct it."
    assert notes[2] == "This button no longer works. Ask me again to get fresh ones."


def test_run_bot_in_thread_serves_until_stopped(tg, chat, admin):
    """What `selfcog serve` runs: its own thread and loop; the API URL may leave out the /bot suffix."""
    stop = threading.Event()
    thread = run_bot_in_thread(chat, admin, token=tg.token, base_url=tg.base_url.removesuffix("/bot"),
                               admin_ids={ADMIN}, stop=stop)
    try:
        sent = tg.send_text(USER, USER, "/start")
        tg.wait_for_message(USER, contains="Ask me anything", since=sent, timeout=30)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert tg.commands() and tg.commands({"type": "chat", "chat_id": ADMIN})[-1]["command"] == "rollback"
