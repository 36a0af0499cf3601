"""The whole loop from the browser: approve corrections, retrain, watch it, chat with the new identity, roll back.

A real retrain (ms-swift on the embedded model, in a worker process) started by the real job runner,
as `selfcog serve` runs it beside the web app, on the quick recipe and identity-only gate of the
`job_runner` fixture (tests/conftest.py). Minutes on a CPU.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.conftest import AURORA, FIVE_CORRECTIONS
from tests.ui.pages import BOT, admin_tab, ask, chat_status, checkbox, logged_in_page, select_all

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(3600)]

# About 6 minutes alone on two cores (worker start, 21 steps, evaluation); far longer on a shared CPU.
RETRAIN_TIMEOUT_MS = 40 * 60_000


def fresh_answer(page, question: str) -> str:
    """The answer in a new conversation, so earlier turns don't change the prompt."""
    page.get_by_role("button", name="New chat").click()
    expect(page.locator(BOT)).to_have_count(0)
    return ask(page, question)


def test_approve_retrain_chat_and_roll_back_from_the_page(open_page, served, job_runner, artifacts):
    store = served.store
    admin = logged_in_page(open_page, "Identity")
    admin.locator("#identity-name textarea").fill(AURORA["name"])
    admin.locator("#identity-author textarea").fill(AURORA["author"])
    admin.locator("#identity-save").click()
    expect(admin.locator("#identity-message")).to_contain_text("You are Aurora")
    for row in FIVE_CORRECTIONS:
        store.corrections.add(question=row["question"], corrected_answer=row["answer"], channel="web",
                              wrong_answer="I am SmolLM, trained by Hugging Face.")

    chat = open_page()
    expect(chat_status(chat)).to_contain_text("Aurora")
    before = fresh_answer(chat, "Who are you?")

    admin_tab(admin, "Corrections")
    admin.get_by_role("button", name="Refresh").click()
    expect(admin.locator("#corrections-table")).to_contain_text("Are you Qwen from Alibaba?")
    expect(checkbox(admin, "corrections-selection", 5)).to_be_visible()
    select_all(admin, "corrections-selection")
    admin.locator("#corrections-approve").click()
    expect(admin.locator("#corrections-message")).to_contain_text("Approved · 已批准: #1, #2, #3, #4, #5")

    admin_tab(admin, "Retrain")
    admin.locator("#retrain-start").click()
    expect(admin.locator("#retrain-message")).to_contain_text("Retrain #1 queued")
    progress = admin.locator("#retrain-progress")
    expect(progress).to_contain_text("training", timeout=RETRAIN_TIMEOUT_MS)
    expect(progress).to_contain_text("step", timeout=RETRAIN_TIMEOUT_MS)
    admin.screenshot(path=artifacts / "retrain-real-progress.png", full_page=True)
    expect(progress).to_contain_text("promoted", timeout=RETRAIN_TIMEOUT_MS)
    run = store.runs.get(1)
    assert run["status"] == "promoted" and run["trigger"] == "web", run.get("report")
    assert len(store.runs.losses(1)) >= 2, "the loss curve had points to show"
    expect(admin.locator("#run-report")).to_contain_text("Gate passed")
    expect(admin.locator("#run-report")).to_contain_text("identity: product")
    expect(admin.locator("#dataset-download")).to_be_visible()
    admin.screenshot(path=artifacts / "retrain-real-report.png", full_page=True)

    expect(chat_status(chat)).to_contain_text("adapter v1")  # the live adapter shows without a reload
    after = fresh_answer(chat, "Who are you?")
    assert "Aurora" in after, after
    chat.screenshot(path=artifacts / "retrain-real-chat.png", full_page=True)

    admin_tab(admin, "Adapters")
    expect(admin.locator("#adapters-table")).to_contain_text("v1")
    admin.locator("#adapter-rollback").click()
    expect(admin.locator("#adapter-message")).to_contain_text("Rolled back: base model")
    expect(chat_status(chat)).to_contain_text("base model")
    assert fresh_answer(chat, "Who are you?") == before
