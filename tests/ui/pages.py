"""What a person does on the pages, as small Playwright helpers the browser tests share.

Waits are on page conditions (an element shows, a button becomes enabled, a text appears), never
on sleeps: on two shared CPU cores an answer takes anywhere from two to thirty seconds.
"""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from tests.ui.conftest import ADMIN_PASSWORD

BOT = '#chatbot [data-testid="bot"]'
USER = '#chatbot [data-testid="user"]'
ANSWER_TIMEOUT_MS = 300_000  # the CPU is shared: answers can wait behind other work


# --- the chat page -----------------------------------------------------------------------------------

def send(page: Page, text: str) -> None:
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input textarea").press("Enter")


def message_buttons(page: Page, role: str):
    """The button bar under each message of a role ("bot" or "user"), in order."""
    return page.locator(f"#chatbot .{role}-row + .message-buttons")


def wait_for_answer(page: Page, count: int) -> str:
    """Wait until the count-th answer is complete (Send, disabled while an answer is on its way, is back
    once it is done); returns its text."""
    expect(page.locator(BOT)).to_have_count(count, timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#chat-send")).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    return page.locator(BOT).nth(count - 1).inner_text().strip()


def ask(page: Page, text: str) -> str:
    """Send a message and return the finished answer."""
    count = page.locator(BOT).count()
    send(page, text)
    return wait_for_answer(page, count + 1)


def open_correction(page: Page, index: int, *, by: str = "Dislike") -> None:
    """Open the correction box for the index-th answer: by 👎 ("Dislike") or by ⚑ → Correct this answer ("Flag")."""
    buttons = message_buttons(page, "bot").nth(index)
    if by == "Dislike":
        buttons.locator('button[aria-label="Dislike"]').click()
    else:
        buttons.locator('button[aria-label="Feedback"]').click()
        buttons.get_by_role("button", name=re.compile("Correct this answer")).click()
    expect(page.locator("#correction-text textarea")).to_be_visible()


def submit_correction(page: Page, text: str) -> None:
    page.locator("#correction-text textarea").fill(text)
    page.locator("#correction-submit").click()


def expect_notice(page: Page, pattern: str, timeout: float = 30_000) -> None:
    expect(page.locator("#chat-notice")).to_contain_text(re.compile(pattern), timeout=timeout)


def chat_status(page: Page):
    return page.locator("#chat-status")


# --- the admin page ----------------------------------------------------------------------------------

def open_admin(page: Page) -> None:
    page.get_by_role("tab", name=re.compile("Admin")).click()
    page.locator("#admin-password input").wait_for()


def log_in(page: Page, password: str) -> None:
    page.locator("#admin-password input").fill(password)
    page.locator("#admin-login").click()


def admin_tab(page: Page, name: str) -> None:
    """Open one of the admin page's sections: Identity, Corrections, Retrain, Adapters, Before, Schedule.

    Gradio 6 mounts a tab's components when the tab is first opened, and applies the values the server
    sent them meanwhile only after the next animation frames (its core's pending updates); what is typed
    before that is overwritten. So wait for two frames, as a person's first keystroke would."""
    page.locator("#admin-panel").get_by_role("tab", name=re.compile(name)).click()
    two_frames(page)


def two_frames(page: Page) -> None:
    """Wait two animation frames: Gradio 6 applies the values the server sent to components it has just
    mounted (a tab or an accordion opened for the first time) only then, over anything typed before."""
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")


def fill_number(page: Page, field: str, value: str, *, tries: int = 3) -> None:
    """Type a number into a gr.Number and leave the field (Tab), as a person does.

    Once in CI (2 busy cores) the field showed its blank initial value again after the typing, most
    likely the lazy mount that admin_tab waits out; it never happened here, not under 25x CPU
    throttling nor with a late page load event. A person who sees their number vanish types it again;
    so does this, at most `tries` times, and fails if it never sticks."""
    for _ in range(tries):
        page.locator(field).fill(value)
        page.locator(field).press("Tab")
        if page.locator(field).input_value() == value:
            return
        page.wait_for_timeout(500)
    expect(page.locator(field)).to_have_value(value)


def open_chat_tab(page: Page) -> None:
    page.get_by_role("tab", name=re.compile("Chat")).click()


def choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a gr.Dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def checkbox(page, elem_id: str, value: int):
    """The checkbox of one option of a gr.CheckboxGroup."""
    return page.locator(f'#{elem_id} input[name="{value}"]')


def select_all(page, elem_id: str) -> None:
    """Tick a gr.CheckboxGroup's select-all box, then wait until every option shows ticked."""
    page.locator(f"#{elem_id} input.select-all-checkbox").check()
    expect(page.locator(f"#{elem_id} [data-testid=checkbox-group] input:not(:checked)")).to_have_count(0)


def logged_in_page(open_page, tab: str | None = None, password: str = ADMIN_PASSWORD):
    """A new tab, logged in on the admin page (and on one of its sections)."""
    page = open_page()
    open_admin(page)
    log_in(page, password)
    expect(page.locator("#admin-panel")).to_be_visible()
    if tab:
        admin_tab(page, tab)
    return page
