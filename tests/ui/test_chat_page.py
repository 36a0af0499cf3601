"""The chat page in headless Chromium, on the real embedded model."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.ui.pages import BOT, USER, ask, chat_status, edit_message, expect_notice, message_buttons, send, \
    wait_for_answer

pytestmark = pytest.mark.browser

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
    assert served.store.db["conversations"].count == 2
    page.reload()
    expect(page.locator("#chatbot")).not_to_contain_text("France")


def test_correcting_an_answer_records_it_pending_review(open_page, served, artifacts):
    page = open_page()
    wrong = ask(page, "Who are you?")
    message_buttons(page, "bot").nth(0).locator('button[aria-label="Like"]').click()
    expect_notice(page, "Thanks")

    edit_message(page, "bot", 0, "I am Aurora, an AI assistant developed by Acme Labs.")
    expect_notice(page, r"Correction #1 received.*pending review")
    expect(page.locator(BOT)).to_have_text([wrong])  # the chat still shows what the bot said
    [correction] = served.store.corrections.list()
    assert (correction["question"], correction["wrong_answer"], correction["corrected_answer"]) == (
        "Who are you?", wrong, "I am Aurora, an AI assistant developed by Acme Labs.")
    assert (correction["status"], correction["channel"]) == ("pending", "web")
    [answer] = [m for m in served.chat.history(1) if m["role"] == "assistant"]
    assert correction["message_id"] == answer["id"]
    assert served.store.conversations.ratings(answer["id"]) == {"up": 1, "down": 0}
    page.screenshot(path=artifacts / "chat-correction.png", full_page=True)

    edit_message(page, "user", 0, "Who am I?")  # a person's own message is not an answer to correct
    expect_notice(page, "Only the bot's answers can be corrected")
    expect(page.locator(USER)).to_have_text(["Who are you?"])
    edit_message(page, "bot", 0, "   ")
    expect_notice(page, "correction is empty")
    assert served.store.corrections.count() == 1


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

    edit_message(page, "bot", 0, '<img src=x onerror="window.__pwned3 = 1">I am Aurora.')
    expect_notice(page, "pending review")
    assert page.evaluate("window.__pwned3") is None
