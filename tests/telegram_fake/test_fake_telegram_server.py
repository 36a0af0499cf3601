"""A real python-telegram-bot 22.8 Application against FakeTelegram, over loopback HTTP.

    .venv/bin/python -m pytest tests/telegram_fake -p no:cacheprovider -o markers=telegram

pytest-asyncio isn't installed: each test runs its scenario with asyncio.run, and waits with
FakeTelegram's *_async helpers so the bot keeps running on the loop meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.error import BadRequest, RetryAfter
from telegram.ext import (
    AIORateLimiter,
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)
from telegram_fake import NOT_MODIFIED, EntityParseError, FakeTelegram, parse_formatted, polling
from telegram_fake.plugin import fake_telegram  # noqa: F401 (the fixture)

pytestmark = pytest.mark.telegram

# PTB 22.8 warns about RetryAfter.retry_after becoming a timedelta even when it raises RetryAfter itself.
ignore_retry_after_deprecation = pytest.mark.filterwarnings("ignore:.*retry_after.*:DeprecationWarning")

USER = 42  # a private chat's id is its user's id
GROUP = -1001


# --- the bot under test ------------------------------------------------------------------------


def again_keyboard() -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[InlineKeyboardButton("again", callback_data="again")]])


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Greets."""
    await update.message.reply_text("hello")


async def echo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Echoes the text, with a button."""
    await update.message.reply_text(f"echo: {update.message.text}", reply_markup=again_keyboard())


async def pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Answers the press first, then marks the message pressed."""
    query = update.callback_query
    await query.answer("again!")
    await query.edit_message_text(f"{query.message.text} (pressed)")


async def voice_size(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Downloads the voice note (getFile, then base_file_url) and tells its size."""
    file = await update.message.voice.get_file()
    data = await file.download_as_bytearray()
    await update.message.reply_text(f"voice: {len(data)} bytes")


def echo_bot(tg: FakeTelegram, rate_limiter: AIORateLimiter) -> Application:
    application = tg.application_builder().rate_limiter(rate_limiter).build()
    application.add_handler(CommandHandler("start", start))
    application.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, echo))
    application.add_handler(MessageHandler(filters.VOICE, voice_size))
    application.add_handler(CallbackQueryHandler(pressed))
    return application


# --- with PTB ----------------------------------------------------------------------------------


def test_echo_command_button_edit_and_voice(fake_telegram):
    tg = fake_telegram

    async def scenario():
        async with polling(echo_bot(tg, AIORateLimiter(max_retries=1))):
            said = tg.send_text(USER, USER, "hi there")
            echoed = await tg.wait_for_message_async(USER, contains="echo: hi there", since=said)
            assert echoed["reply_markup"] == again_keyboard().to_dict()

            started = tg.send_text(USER, USER, "/start")  # the bot_command entity is filled in
            await tg.wait_for_message_async(USER, contains="hello", since=started)

            press = tg.press_button(USER, USER, echoed["message_id"], "again")
            answer = await tg.wait_for_async(lambda: tg.callback_answer(press.callback_query_id))
            assert answer["text"] == "again!"
            edited = await tg.wait_for_message_async(USER, contains="(pressed)")
            assert edited["message_id"] == echoed["message_id"] and "edit_date" in edited
            assert "reply_markup" not in edited  # an edit without reply_markup drops the keyboard

            spoken = tg.send_voice(USER, USER, b"OggS-8bytes"[:8])
            await tg.wait_for_message_async(USER, contains="voice: 8 bytes", since=spoken)

            mentioned = tg.send_text(GROUP, USER, "@selfcog_test_bot hi", chat_type="group")
            in_group = await tg.wait_for_message_async(GROUP, contains="echo: @selfcog_test_bot", since=mentioned)
            assert in_group["chat"]["type"] == "group"

    asyncio.run(scenario())

    assert [call.method for call in tg.calls[:3]] == ["getMe", "deleteWebhook", "getUpdates"]
    [edit] = tg.calls_to("editMessageText")
    assert edit.params == {"chat_id": USER, "message_id": 2, "text": "echo: hi there (pressed)"}
    assert [message["text"] for message in tg.sent] == [
        "echo: hi there",
        "hello",
        "voice: 8 bytes",
        "echo: @selfcog_test_bot hi",
    ]
    with pytest.raises(ValueError, match="no button"):
        tg.press_button(USER, USER, 2, "missing")


@ignore_retry_after_deprecation
def test_flood_control_is_waited_out_by_the_rate_limiter(fake_telegram):
    """AIORateLimiter(max_retries=1) pauses retry_after + 0.1 s on a 429, then sends again."""
    tg = fake_telegram

    async def scenario():
        async with polling(echo_bot(tg, AIORateLimiter(max_retries=1))):
            tg.fail_next("sendMessage", retry_after=1)
            said = tg.send_text(USER, USER, "flood")
            await tg.wait_for_message_async(USER, contains="echo: flood", since=said)

    asyncio.run(scenario())

    refused, delivered = tg.calls_to("sendMessage")
    assert refused.response == {
        "ok": False,
        "error_code": 429,
        "description": "Too Many Requests: retry after 1",
        "parameters": {"retry_after": 1},
    }
    assert delivered.ok and delivered.time - refused.time >= 1.0


@ignore_retry_after_deprecation
def test_rate_limiter_by_default_passes_the_429_on(fake_telegram):
    """AIORateLimiter() has max_retries=0: the caller gets RetryAfter and nothing is resent."""
    tg = fake_telegram
    tg.add_chat(USER)

    async def scenario():
        async with echo_bot(tg, AIORateLimiter()) as application:
            tg.fail_next("sendMessage", retry_after=2)
            with pytest.raises(RetryAfter) as refused:
                await application.bot.send_message(USER, "now")
            assert refused.value.retry_after == 2
            await application.bot.send_message(USER, "later")

    asyncio.run(scenario())
    assert [call.status for call in tg.calls_to("sendMessage")] == [429, 200]


def test_telegram_refusals_reach_ptb_as_bad_request(fake_telegram):
    tg = fake_telegram
    tg.add_chat(USER)

    async def scenario():
        async with echo_bot(tg, AIORateLimiter()) as application:
            bot = application.bot
            # PTB drops "Bad Request: " and str.capitalize()s the rest: "Unsupported" becomes "unsupported".
            escaped = await bot.send_message(USER, "1 &lt; 2 <b>bold</b>", parse_mode="HTML")
            assert escaped.text == "1 < 2 bold" and escaped.entities[0].type == "bold"
            with pytest.raises(BadRequest, match='unsupported start tag "think" at byte offset 0'):
                await bot.send_message(USER, "<think>hmm</think> 42", parse_mode="HTML")
            with pytest.raises(BadRequest, match="^Message is too long$"):
                await bot.send_message(USER, "x" * 4097)

            same = await bot.send_message(USER, "same", reply_markup=again_keyboard())
            with pytest.raises(BadRequest, match="^Message is not modified"):
                await bot.edit_message_text(
                    "same", chat_id=USER, message_id=same.message_id, reply_markup=again_keyboard()
                )
            with pytest.raises(BadRequest, match="^Chat not found$"):
                await bot.send_message(7, "hello?")

    asyncio.run(scenario())
    not_modified = tg.calls_to("editMessageText")[-1]
    assert not_modified.status == 400 and not_modified.description == f"Bad Request: {NOT_MODIFIED}"


# --- over plain HTTP ---------------------------------------------------------------------------


def test_long_poll_answers_as_soon_as_an_update_arrives(fake_telegram):
    tg = fake_telegram
    get_updates = f"{tg.base_url}{tg.token}/getUpdates"
    threading.Timer(0.2, tg.send_text, args=(USER, USER, "wake up")).start()

    asked = time.monotonic()
    with httpx.Client(timeout=15) as http:
        answer = http.post(get_updates, json={"timeout": 10}).json()  # a JSON body
        assert time.monotonic() - asked < 2
        [update] = answer["result"]
        assert update["message"]["text"] == "wake up" and update["message"]["date"] < 10**10  # seconds

        confirmed = http.post(get_updates, data={"offset": str(update["update_id"] + 1)}).json()  # a form
        assert confirmed == {"ok": True, "result": []}


def test_multipart_unknown_method_wrong_token_and_closing(fake_telegram):
    tg = fake_telegram
    tg.add_chat(USER)
    api = f"{tg.base_url}{tg.token}"
    with httpx.Client() as http:  # one kept-alive connection, as a bot holds one
        upload = {"doc": ("a.txt", b"abc")}
        sent = http.post(f"{api}/sendMessage", data={"chat_id": str(USER), "text": "123"}, files=upload)
        assert sent.json()["result"]["text"] == "123"  # text stays text, though it looks like a number
        assert tg.calls_to("sendMessage")[-1].files == {"doc": b"abc"}

        unknown = http.post(f"{api}/sendTelepathy")
        assert unknown.status_code == 404 and unknown.json()["error_code"] == 404
        wrong_token = http.post(f"{tg.base_url}000:wrong/getMe")
        assert wrong_token.status_code == 401 and wrong_token.json()["description"] == "Unauthorized"

        tg.close()  # a bot still polling now gets 502 (PTB backs off) instead of spinning on empty answers
        assert http.post(f"{api}/getUpdates").status_code == 502


def test_waiting_explains_a_timeout_and_refuses_to_block_the_loop(fake_telegram):
    tg = fake_telegram
    with pytest.raises(TimeoutError, match="never called getUpdates"):
        tg.wait_for_message(USER, contains="anything", timeout=0.05)

    async def blocking_inside_the_loop():
        with pytest.raises(RuntimeError, match="wait_for_message_async"):
            tg.wait_for_message(USER)

    asyncio.run(blocking_inside_the_loop())


# --- HTML, against tdlib's own test vectors ------------------------------------------------------


@pytest.mark.parametrize(
    ("parse_mode", "text", "error"),
    [
        ("HTML", "🏟 🏟&lt;<abac aba>", 'Unsupported start tag "abac" at byte offset 13'),
        ("HTML", "🏟 🏟&lt;<i    aba  =  190azAz-.,", "Unexpected end of name token at byte offset 27"),
        ("HTML", "🏟 🏟&lt;<i>a</em   >", 'Unmatched end tag at byte offset 17, expected "</i>", found "</em>"'),
        ("HTML", "🏟 🏟&lt;<b></b></", "Unexpected end tag at byte offset 20"),
        ("HTML", "<b>x", 'Can\'t find end tag corresponding to start tag "b"'),
    ],
)
def test_markup_errors_match_tdlib(parse_mode, text, error):
    with pytest.raises(EntityParseError) as refused:
        parse_formatted(text, parse_mode)
    assert str(refused.value) == error


@pytest.mark.parametrize(
    ("parse_mode", "text", "plain", "entities"),
    [
        ("HTML", "🏟 🏟<i>🏟 &gt;<b aba   =   caba>&lt🏟</b></i>", "🏟 🏟🏟 ><🏟", [("italic", 5, 7), ("bold", 9, 3)]),
        ("HTML", '<pre><code class="language-py">x = 1</code></pre>', "x = 1", [("pre", 0, 5)]),
        ("HTML", "&ge;&lt;&amp;&#12345678;", "&ge;<&&#12345678;", []),
    ],
)
def test_markup_entities_match_tdlib(parse_mode, text, plain, entities):
    parsed_text, parsed_entities = parse_formatted(text, parse_mode)
    assert parsed_text == plain
    assert [(e["type"], e["offset"], e["length"]) for e in parsed_entities] == entities
