"""The chat page in headless Chromium, on the real embedded model."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

import sqlite3

from tests.ui.pages import BOT, USER, ask, chat_status, expect_notice, message_buttons, open_correction, send, \
    submit_correction, wait_for_answer

pytestmark = pytest.mark.browser

TOAST = '[data-testid="toast-body"]'  # Gradio's pop-up for an error (or warning)

# Records every text the newest answer shows, so a test can tell streaming from one final update.
WATCH_ANSWERS = """() => {
  window.__seen = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll('#chatbot [data-testid="bot"]');
    const text = answers.length ? answers[answers.length - 1].innerText.trim() : "";
    if (text && window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
  }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
}"""


def test_an_answer_streams_in_and_stays_with_this_browser(open_page, served, artifacts):
    page = open_page()
    expect(chat_status(page)).to_contain_text("base model")
    page.evaluate(WATCH_ANSWERS)
    answer = ask(page, "What is the capital of France?")

    seen = page.evaluate("window.__seen")
    assert len(seen) >= 3 and seen[-1] == answer, f"the answer arrived in one piece: {seen}"
    assert all(later.startswith(earlier[:-1]) for earlier, later in zip(seen, seen[1:])), seen
    assert "Paris" in answer
    [conversation] = served.store.db["conversations"].rows
    stored = served.chat.history(conversation["id"])
    assert [(m["role"], m["text"]) for m in stored] == [("user", "What is the capital of France?"), ("assistant", answer)]
    assert conversation["channel"] == "web" and len(conversation["chat_key"]) == 32
    page.screenshot(path=artifacts / "chat-page.png", full_page=True)

    page.reload()  # the conversation comes back from the store
    expect(page.locator(BOT)).to_have_text([answer])
    second = ask(page, "And of Italy?")  # multi-turn: the same stored conversation continues
    assert len(served.chat.history(conversation["id"])) == 4 and second

    page.get_by_role("button", name="New chat").click()
    expect(page.locator(BOT)).to_have_count(0)
    assert served.store.db["conversations"].count == 1  # an empty chat writes nothing
    ask(page, "Hello!")
    assert served.store.db["conversations"].count == 2  # its first message starts it
    page.reload()
    expect(page.locator("#chatbot")).not_to_contain_text("France")


def test_correcting_an_answer_records_it_pending_review(open_page, served, artifacts):
    page = open_page()
    wrong = ask(page, "Who are you?")
    message_buttons(page, "bot").nth(0).locator('button[aria-label="Like"]').click()
    expect_notice(page, "Thanks")
    assert message_buttons(page, "user").locator("button").evaluate_all(
        "buttons => buttons.map(b => b.getAttribute('aria-label'))") == ["Copy message"], "nothing to correct there"

    open_correction(page, 0, by="Flag")
    box = page.locator("#correction-text textarea")
    expect(box).to_have_value("")  # not prefilled with the wrong answer
    expect(page.locator("#correction-about")).to_contain_text("Who are you?")
    size = box.bounding_box()
    assert size["width"] > 600 and size["height"] > 80, size
    page.screenshot(path=artifacts / "chat-correction-box.png", full_page=True)
    submit_correction(page, "   ")
    expect(page.locator("#correction-notice")).to_contain_text("correction is empty")

    submit_correction(page, "I am Aurora, an AI assistant developed by Acme Labs.")
    expect_notice(page, r"Correction #1 received.*pending review")
    expect(box).to_be_hidden()
    expect(page.locator(BOT)).to_have_text([wrong])  # the chat still shows what the bot said
    [correction] = served.store.corrections.list()
    assert (correction["question"], correction["wrong_answer"], correction["corrected_answer"]) == (
        "Who are you?", wrong, "I am Aurora, an AI assistant developed by Acme Labs.")
    assert (correction["status"], correction["channel"]) == ("pending", "web")
    [answer] = [m for m in served.chat.history(1) if m["role"] == "assistant"]
    assert correction["message_id"] == answer["id"]
    assert served.store.conversations.ratings(answer["id"]) == {"up": 1, "down": 0}

    open_correction(page, 0, by="Dislike")  # 👎 asks for the right answer too
    expect_notice(page, "What should I have said")
    expect(box).to_have_value("")
    page.locator("#correction-cancel").click()
    expect(box).to_be_hidden()
    assert served.store.corrections.count() == 1


@pytest.mark.parametrize("chat_options", [{"save_within_s": 0.5}])
def test_a_locked_database_keeps_what_was_typed(open_page, served):
    """While another process holds the write lock, a message and a correction stay where they were typed."""
    served.store.busy_timeout_s = 0.2  # each try's wait for the lock (set before the page's threads connect)
    page = open_page()
    ask(page, "Who are you?")
    open_correction(page, 0, by="Flag")
    box, correction = page.locator("#chat-input textarea"), page.locator("#correction-text textarea")

    other = sqlite3.connect(served.store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing, for longer than the chat waits
    send(page, "And who made you?")
    expect_notice(page, "Couldn't save")
    expect(box).to_have_value("And who made you?")
    submit_correction(page, "I am Aurora.")
    expect(page.locator("#correction-notice")).to_contain_text("Couldn't save")
    expect(correction).to_have_value("I am Aurora.")
    expect(page.locator(TOAST)).to_have_count(0)  # no red error overlay
    other.execute("ROLLBACK")

    page.locator("#correction-submit").click()
    expect_notice(page, "Correction #1 received")
    page.locator("#chat-send").click()
    wait_for_answer(page, 2)
    expect(box).to_have_value("")
    assert [m["text"] for m in served.chat.history(1) if m["role"] == "user"] == ["Who are you?", "And who made you?"]


def test_a_lone_surrogate_gets_an_answer_not_an_error(open_page, served):
    page = open_page()
    page.locator("#chat-input textarea").evaluate(  # half an emoji, as a broken client or paste can send
        "box => { box.value = 'Hi \\uD83D there'; box.dispatchEvent(new Event('input', {bubbles: true})); }")
    page.locator("#chat-send").click()
    wait_for_answer(page, 1)
    expect(page.locator(USER)).to_have_text(["Hi \ufffd there"])
    expect(page.locator(TOAST)).to_have_count(0)
    open_correction(page, 0, by="Flag")
    page.locator("#correction-text textarea").evaluate(
        "box => { box.value = 'I am \\uDE00 Aurora'; box.dispatchEvent(new Event('input', {bubbles: true})); }")
    page.locator("#correction-submit").click()
    expect_notice(page, "Correction #1 received")
    assert served.store.corrections.list()[0]["corrected_answer"] == "I am \ufffd Aurora"
    expect(page.locator(TOAST)).to_have_count(0)


def test_bad_input_is_refused_with_a_reason(open_page, served):
    page = open_page()
    box = page.locator("#chat-input textarea")
    page.locator("#chat-send").click()
    expect_notice(page, "The message is empty")

    send(page, "x" * 50_000)
    expect_notice(page, "50,000 characters long; the limit is 8,000")
    assert len(box.input_value()) == 50_000, "the text stays in the box, to be shortened"
    assert served.store.db["messages"].count == 0

    script = '<img src=x onerror="window.__pwned = 1"> <script>window.__pwned2 = 1</script> Say hi'
    send(page, script)
    wait_for_answer(page, 1)
    expect(page.locator(USER)).to_contain_text(["Say hi"])
    assert page.evaluate("[window.__pwned, window.__pwned2]") == [None, None]
    assert page.locator("#chatbot img[onerror], #chatbot script").count() == 0
    assert served.store.db["messages"].count == 2  # stored as text, shown inert

    open_correction(page, 0, by="Flag")
    submit_correction(page, '<img src=x onerror="window.__pwned3 = 1">I am Aurora.')
    expect_notice(page, "pending review")
    assert page.evaluate("window.__pwned3") is None
