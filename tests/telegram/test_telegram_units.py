"""The Telegram face's pure parts: splitting, escaping, progress texts, limits, retries."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from telegram.error import BadRequest, NetworkError, RetryAfter, TimedOut
from telegram_fake import parse_formatted

from bot.run_summary import summarize
from bot.telegram.admin_handlers import run_text
from bot.telegram.chat_handlers import PROMPT, answer_keyboard
from bot.telegram.flow import PatientRateLimiter, Refusal, UserLimits
from bot.telegram.text import MAX_MESSAGE_LENGTH, escape, plain, split_text, utf16_length

pytestmark = pytest.mark.telegram


# --- splitting ---------------------------------------------------------------------------------------

def test_short_and_empty_texts():
    assert split_text("  hello  ") == ["hello"]
    assert split_text(" \n ") == []
    assert split_text("x" * MAX_MESSAGE_LENGTH) == ["x" * MAX_MESSAGE_LENGTH]


def test_cuts_prefer_a_blank_line_then_a_newline_then_a_space():
    paragraphs = "aaaa aaaa\nbbbb bbbb\n\ncccc cccc"
    assert split_text(paragraphs, limit=26) == ["aaaa aaaa\nbbbb bbbb", "cccc cccc"]
    assert split_text("aaaa aaaa\nbbbb bbbb", limit=15) == ["aaaa aaaa", "bbbb bbbb"]
    assert split_text("aaaa bbbb cccc", limit=10) == ["aaaa bbbb", "cccc"]


def test_a_separator_right_after_the_limit_is_used():
    assert split_text("a" * 10 + "\n" + "b" * 5, limit=10) == ["a" * 10, "b" * 5]


def test_no_separator_means_a_hard_cut():
    assert split_text("x" * 25, limit=10) == ["x" * 10, "x" * 10, "x" * 5]
    assert split_text("ab " + "x" * 20, limit=10)[0] == "ab xxxxxxx"  # a space too early makes tiny parts


def test_limit_counts_utf16_units_like_telegram():
    text = "😀" * 8  # 16 UTF-16 units
    parts = split_text(text, limit=10)
    assert parts == ["😀" * 5, "😀" * 3] and all(utf16_length(p) <= 10 for p in parts)
    assert utf16_length("a😀") == 3


def test_random_texts_keep_every_word_and_fit():
    rng = random.Random(7)
    words = ["hi", "Telegram", "😀", "<b>", "&amp;", "\n", "\n\n", "x" * 40, "长文本没有空格"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 120)))
        limit = rng.randint(8, 80)
        parts = split_text(text, limit)
        assert all(p and p == p.strip() and utf16_length(p) <= limit for p in parts)
        assert "".join("".join(parts).split()) == "".join(text.split())  # nothing lost but whitespace


def test_earlier_parts_stay_put_while_a_streamed_text_grows():
    rng = random.Random(3)
    text = " ".join(rng.choice(["word", "longer words", "line\n", "para\n\n"]) for _ in range(400))
    final = split_text(text, 100)
    for end in range(0, len(text), 7):
        settled = split_text(text[:end], 100)[:-1]
        assert settled == final[: len(settled)]  # only the last part still changes


# --- escaping ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["1 < 2 & 3 > 2", "<b>not bold</b>", "&amp; stays literal", "*_`[]()~>#+-=|{}.!",
                                  "<think>hmm</think>", "a\nb"])
def test_escaped_text_parses_back_to_itself_with_no_entities(text):
    assert parse_formatted(escape(text), "HTML") == (text, [])


def test_plain_is_what_the_html_says():
    assert plain("<b>Correction #3</b> &lt;ok&gt; &amp; done") == "Correction #3 <ok> & done"


# --- buttons and prompts ------------------------------------------------------------------------------

def test_callback_data_fits_telegrams_64_bytes():
    keyboard = answer_keyboard(2**53, 2**53, rated=1)
    data = [button.callback_data for row in keyboard.inline_keyboard for button in row]
    assert all(len(d.encode()) <= 64 for d in data) and keyboard.inline_keyboard[0][0].text == "👍 ✓"


def test_correction_prompt_is_recognised_by_its_text():
    assert PROMPT.match("✏️ User 42, what should I have said? Reply ... (correcting answer #17)").group(1) == "17"
    assert PROMPT.match("What should I have said? (correcting answer #17)") is None


# --- retrain progress and results (bot.run_summary has the facts; this is only their format) --------

def test_progress_is_the_summary_line():
    run = {"id": 4, "status": "running", "stage": "training", "step": 12, "total_steps": 40, "loss": 1.23456,
           "eta_s": 95}
    assert plain(run_text(summarize(run))) == "🔁 " + summarize(run).outcome_line
    assert "step 12/40" in plain(run_text(summarize(run)))


def test_results_show_outcome_reasons_scores_and_time():
    metrics = {"candidate": {"identity_mean": 0.8, "retention": 0.91}, "base": {"identity_mean": 0.1}}
    rejected = plain(run_text(summarize({"id": 6, "status": "rejected", "report": {
        "reasons": ["retention 0.5 < 0.8 <!>", "identity 0.4 < 0.9"], "metrics": metrics, "seconds": 130}})))
    lines = rejected.split("\n")
    assert lines[0].startswith("❌ Retrain #6 rejected: retention 0.5 < 0.8 <!>")
    assert lines[1:] == ["• identity 0.4 < 0.9", "candidate: identity 0.80; retention 0.91", "base: identity 0.10",
                         "Took 2 min 10 s."]


def test_a_retrain_nobody_will_train_says_what_to_start():
    text = plain(run_text(summarize({"id": 2, "status": "queued", "waiting_for_runner": True})))
    assert "no job runner is running" in text and "selfcog serve" in text


# --- limits and retries -------------------------------------------------------------------------------

def test_user_limits_allow_a_burst_then_warn_once_with_the_wait_then_drop():
    now = [100.0]
    limits = UserLimits(2, 60, clock=lambda: now[0])
    assert [limits.take(1), limits.take(1)] == [None, None]
    now[0] += 10
    assert limits.take(1) == Refusal(wait_s=50.0, warn=True)
    assert limits.take(1) == Refusal(wait_s=50.0, warn=False) and limits.take(2) is None  # others unaffected
    now[0] += 50
    assert limits.take(1) is None  # the window has moved on


def never_sent() -> NetworkError:
    error = NetworkError("httpx.ConnectError: connection refused")
    error.__cause__ = httpx.ConnectError("connection refused")
    return error


@pytest.mark.parametrize(("error", "endpoint", "calls"), [
    (NetworkError("Bad Gateway"), "editMessageText", 3),  # an edit twice is harmless
    (TimedOut(), "editMessageText", 3),
    (never_sent(), "sendMessage", 3),  # never left: sending it now is the first time
    (NetworkError("Bad Gateway"), "sendMessage", 1),  # may have arrived: twice would show twice
    (TimedOut(), "sendMessage", 1),
    (BadRequest("Chat not found"), "editMessageText", 1),  # Telegram said no: asking again won't help
])
def test_network_errors_are_retried_only_where_a_repeat_is_harmless(error, endpoint, calls):
    made = []

    async def callback(*args, **kwargs):
        made.append(1)
        if len(made) < 3:
            raise error
        return True

    async def scenario():
        limiter = PatientRateLimiter(backoff_s=0.01)
        return await limiter.process_request(callback, (), {}, endpoint, {"chat_id": 1}, None)

    if calls == 3:
        assert asyncio.run(scenario()) is True
    else:
        with pytest.raises(type(error)):
            asyncio.run(scenario())
    assert len(made) == calls


def test_a_429_holds_back_every_chat_and_patience_outlasts_the_retry_count():
    async def scenario():
        loop = asyncio.get_running_loop()
        limiter = PatientRateLimiter(max_retries=1)
        flooded, times = asyncio.Event(), {}

        async def edit():
            times.setdefault("edit", []).append(loop.time())
            if len(times["edit"]) <= 3:
                flooded.set()
                raise RetryAfter(0.2)
            return True

        async def other_chat():
            times["other"] = loop.time()
            return True

        patient = asyncio.ensure_future(limiter.process_request(edit, (), {}, "editMessageText", {"chat_id": 1}, 30))
        await flooded.wait()
        await limiter.process_request(other_chat, (), {}, "sendMessage", {"chat_id": 2}, None)
        assert await patient is True  # three 429s, though max_retries is 1: the call had 30 s of patience
        return times

    times = asyncio.run(scenario())
    assert times["other"] - times["edit"][0] >= 0.2  # the other chat waited out the first retry_after
    assert all(b - a >= 0.2 for a, b in zip(times["edit"], times["edit"][1:]))
