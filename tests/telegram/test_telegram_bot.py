"""The Telegram bot end to end: the real PTB Application polling the loopback fake Bot API, the real model.

    .venv/bin/python -m pytest tests/telegram -m "not slow"
"""

from __future__ import annotations

import logging
import re
import threading

import pytest
from telegram_helpers import ADMIN, GROUP, OTHER, USER, ScriptedEngine, answers_in, drive, keyboard_data

from bot.chat import ChatService
from bot.telegram import run_bot_in_thread
from bot.telegram.text import MAX_MESSAGE_LENGTH, send

pytestmark = [pytest.mark.telegram, pytest.mark.filterwarnings("ignore:.*retry_after.*:DeprecationWarning")]

GENERATION_S = 120  # waiting for the model on a busy 2-core CPU


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
    assert [(c.method, c.description) for c in tg.calls if c.method not in ("getUpdates", "setMyCommands") and not c.ok] == []


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
        await tg.wait_for_async(lambda: tg.callback_answer(press.callback_query_id))
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


def test_per_user_rate_limit_warns_once_with_the_wait(tg, admin, store):
    chat = ChatService(store, ScriptedEngine("Hello there."))

    async def scenario(application):
        tg.send_text(USER, USER, "one")
        await tg.wait_for_message_async(USER, contains="Hello there.")
        second = tg.send_text(USER, USER, "two")
        await tg.wait_for_message_async(USER, contains="writing faster than I can answer", since=second)
        tg.send_text(USER, USER, "three")
        other = tg.send_text(OTHER, OTHER, "hi")  # someone else is not limited
        await tg.wait_for_message_async(OTHER, contains="Hello there.", since=other)

    drive(tg, chat, admin, scenario, message_rate=(1, 60))
    first, note = tg.messages(USER)  # "three" got nothing: one note is enough
    assert first["text"] == "Hello there."
    assert re.fullmatch(r"You're writing faster than I can answer\. Please wait \d+ s, then try again\.", note["text"])
    questions = [m["text"] for m in store.conversations.messages(store.conversations.latest("telegram", str(USER)))
                 if m["role"] == "user"]
    assert questions == ["one"]  # refused at the door: never stored, never queued


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

    from bot.telegram.chat_handlers import NOT_FOUND, answer_keyboard

    async def scenario(application):
        tg.add_chat(USER)
        unknown = await application.bot.send_message(USER, "an answer from a lost database",
                                                     reply_markup=answer_keyboard(999, USER))
        old = await application.bot.send_message(USER, "from an older bot", reply_markup=InlineKeyboardMarkup(
            [[InlineKeyboardButton("Like", callback_data="like:3")]]))
        for data in (f"up:999:{USER}", f"fix:999:{USER}"):
            press = tg.press_button(USER, USER, unknown.message_id, data)
            await tg.wait_for_async(lambda: tg.callback_answer(press.callback_query_id))  # answered first
            await tg.wait_for_message_async(USER, contains=NOT_FOUND, since=old.message_id + (data[0] == "f"))
        press = tg.press_button(USER, USER, old.message_id, "like:3")
        return (await tg.wait_for_async(lambda: tg.callback_answer(press.callback_query_id)))["text"]

    assert drive(tg, chat, admin, scenario) == "This button no longer works. Ask me again to get fresh ones."
    assert [m["text"] for m in tg.messages(USER)][2:] == [NOT_FOUND, NOT_FOUND]


def test_run_bot_in_thread_serves_until_stopped(tg, chat, admin):
    """What `selfcog serve` runs: its own thread and loop; the API URL may leave out the /bot suffix."""
    tg.add_chat(ADMIN)  # the admin wrote to the bot before: their command menu is set at start
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


def test_in_groups_only_the_asker_may_correct_an_answer(tg, admin, store):
    chat = ChatService(store, ScriptedEngine("I am a bot."))
    mention = f"@{tg.bot['username']}"

    async def scenario(application):
        tg.send_text(GROUP, USER, f"{mention} Who are you?", chat_type="group")
        answer = await tg.wait_for_async(lambda: next((m for m in tg.messages(GROUP) if keyboard_data(m)), None), 20)
        plain = tg.send_text(GROUP, OTHER, "/correct You are Aurora.", chat_type="group")
        await tg.wait_for_message_async(GROUP, contains="Reply /correct to the answer", since=plain)
        replied = tg.send_text(GROUP, OTHER, "/correct You are Aurora.", chat_type="group", reply_to=answer["message_id"])
        await tg.wait_for_message_async(GROUP, contains="Only the person who asked", since=replied)
        own = tg.send_text(GROUP, USER, "/correct I am Aurora.", chat_type="group")
        await tg.wait_for_message_async(GROUP, contains="saved your correction", since=own)

    drive(tg, chat, admin, scenario)

    [correction] = store.corrections.list(status="pending")
    [stored] = answers_in(store, GROUP)
    assert (correction["corrected_answer"], correction["submitter"], correction["message_id"]) == (
        "I am Aurora.", str(USER), stored["id"])


def test_retrain_with_no_job_runner_says_what_to_start(tg, admin, store):
    admin.add_correction("Who made you?", "Acme Labs made me.", by="web", approve=True)
    chat = ChatService(store, ScriptedEngine("-"))

    async def scenario(application):
        asked = tg.send_text(ADMIN, ADMIN, "/retrain")
        return await tg.wait_for_message_async(ADMIN, contains="Retrain #", since=asked)

    shown = drive(tg, chat, admin, scenario)
    [run] = store.runs.list()
    assert run["status"] == "queued" and run["trigger"] == "telegram"
    assert "no job runner is running" in shown["text"] and "selfcog serve" in shown["text"]


def test_replies_that_would_be_too_long_are_cut_or_split_not_failed(tg, admin, store):
    from bot.errors import UserError

    chat = ChatService(store, ScriptedEngine("-"))

    def long_refusal():
        raise UserError("too much " * 600)  # 5,400 characters

    chat.status = long_refusal

    async def scenario(application):
        command = tg.send_text(USER, USER, "/a" + "-" * 4089)  # a 4,091-character unknown command ("/a" its entity)
        reply = await tg.wait_for_message_async(USER, contains="I don't know", since=command)
        asked = tg.send_text(USER, USER, "/whoami")
        await tg.wait_for_async(lambda: len(tg.messages(USER)) == 3, what="the refusal in two parts")
        return reply, asked

    reply, asked = drive(tg, chat, admin, scenario)
    assert len(reply["text"]) < 200 and "/help" in reply["text"]
    first, second = tg.messages(USER)[1:]
    assert first["reply_to_message"]["message_id"] == asked.message_id
    assert (first["text"] + " " + second["text"]).split() == ("too much " * 600).split()
    assert not any("went wrong" in m["text"] for m in tg.messages(USER))


def test_an_admin_who_never_wrote_gets_the_menu_with_their_first_message(tg, admin, store):
    chat = ChatService(store, ScriptedEngine("-"))
    admin_menu = {"type": "chat", "chat_id": ADMIN}

    async def scenario(application):
        assert tg.commands() and tg.commands(admin_menu) == []  # Telegram refused it: no chat yet
        hello = tg.send_text(ADMIN, ADMIN, "/start")
        await tg.wait_for_message_async(ADMIN, contains="Ask me anything", since=hello)
        await tg.wait_for_async(lambda: tg.commands(admin_menu), what="the admin's command menu")

    drive(tg, chat, admin, scenario)
    assert [c["command"] for c in tg.commands(admin_menu)][-2:] == ["activate", "rollback"]
    assert len([c for c in tg.calls_to("setMyCommands") if c.ok]) == 2  # everyone's, then the admin's once


def test_a_message_the_store_could_not_save_is_asked_for_again(tg, admin, store):
    from bot.chat import SaveFailed

    chat = ChatService(store, ScriptedEngine("-"))

    def locked(*args, **kwargs):
        raise SaveFailed("Couldn't save — try again.")

    chat.send = locked

    async def scenario(application):
        asked = tg.send_text(USER, USER, "Are you there?")
        return await tg.wait_for_message_async(USER, since=asked)

    note = drive(tg, chat, admin, scenario)
    assert note["text"] == "Couldn't save — try again." and note["reply_to_message"]["message_id"] == 1
