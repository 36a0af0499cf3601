"""The Telegram face's pure parts: splitting, escaping, progress texts, limits, retries."""

from __future__ import annotations

import asyncio
import random

import pytest
from telegram.error import BadRequest, NetworkError, TimedOut
from telegram_fake import parse_formatted

from bot.telegram.admin_handlers import duration, run_text
from bot.telegram.app import PatientRateLimiter
from bot.telegram.chat_handlers import PROMPT, answer_keyboard
from bot.telegram.services import UserLimits
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


# --- retrain progress and results ---------------------------------------------------------------------

def test_progress_shows_stage_step_loss_and_eta():
    run = {"id": 4, "status": "running", "stage": "training", "step": 12, "total_steps": 40, "loss": 1.23456,
           "eta_s": 95}
    assert plain(run_text(run)) == "🔁 Retrain #4: training\nstep 12/40 (30%) · loss 1.235 · about 1 min 35 s left"
    assert plain(run_text({"id": 4, "status": "queued"})).startswith("🔁 Retrain #4 queued")


def test_results_show_outcome_metrics_and_reasons():
    metrics = {"candidate": {"identity": {"product": 0.95, "none": 0.5}, "identity_mean": 0.8, "retention": 0.91},
               "base": {"identity_mean": 0.1, "retention": 1.0}}
    promoted = run_text({"id": 5, "status": "promoted", "adapter_version": 2,
                         "report": {"metrics": metrics, "seconds": 130}})
    assert plain(promoted) == ("✅ Retrain #5 promoted: adapter v2 is live.\n"
                               "candidate: identity 0.80 (product 0.95, none 0.50); retention 0.91\n"
                               "base: identity 0.10; retention 1.00\nTook 2 min 10 s.")
    rejected = plain(run_text({"id": 6, "status": "rejected", "report": {"reasons": ["retention 0.5 < 0.8 <!>"]}}))
    assert "rejected" in rejected and "• retention 0.5 < 0.8 <!>" in rejected
    failed = plain(run_text({"id": 7, "status": "failed", "error": "worker died"}))
    assert "failed: worker died" in failed and "previous adapter stays live" in failed


def test_duration():
    assert [duration(s) for s in (5, 65, 3725)] == ["5 s", "1 min 5 s", "1 h 2 min"]


# --- limits and retries -------------------------------------------------------------------------------

def test_user_limits_allow_a_burst_then_warn_once_then_drop():
    async def scenario():
        limits = UserLimits(2, 60)
        return [await limits.allow(1) for _ in range(4)] + [await limits.allow(2)]

    assert asyncio.run(scenario()) == ["ok", "ok", "warn", "drop", "ok"]


@pytest.mark.parametrize(("error", "endpoint", "calls"), [
    (NetworkError("Bad Gateway"), "sendMessage", 3),  # lost on the way: retried
    (TimedOut(), "editMessageText", 3),  # an edit twice is harmless
    (TimedOut(), "sendMessage", 1),  # a send that timed out may have arrived: not repeated
    (BadRequest("Chat not found"), "sendMessage", 1),  # Telegram said no: asking again won't help
])
def test_network_errors_are_retried_but_refusals_and_timed_out_sends_are_not(error, endpoint, calls):
    made = []

    async def callback(*args, **kwargs):
        made.append(1)
        if len(made) < 3:
            raise error
        return True

    async def scenario():
        limiter = PatientRateLimiter(network_retries=3, backoff_s=0.01)
        await limiter.initialize()
        try:
            return await limiter.process_request(callback, (), {}, endpoint, {"chat_id": 1}, None)
        finally:
            await limiter.shutdown()

    if calls == 3:
        assert asyncio.run(scenario()) is True
    else:
        with pytest.raises(type(error)):
            asyncio.run(scenario())
    assert len(made) == calls
