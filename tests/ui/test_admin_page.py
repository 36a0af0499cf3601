"""The admin page in headless Chromium: login, review, identity, schedule, retrain progress, adapters.

The retrain here is played by the test writing the run's row the way the job runner does, so the
page's side (request, progress bar, loss curve, report, download, cancel) is checked in seconds;
test_retrain_from_the_page.py runs a real retrain through the real job runner.
"""

from __future__ import annotations

import inspect
import json
import re

import gradio as gr
import pytest
from playwright.sync_api import expect

from tests.ui.conftest import ADMIN_PASSWORD
from tests.ui.pages import admin_tab, chat_status, checkbox, choose, log_in, logged_in_page, open_admin, \
    open_chat_tab, select_all

SEEDED = [("Who are you?", "I am Aurora, made by Acme Labs.", "web"),
          ("你是谁？", "我是Aurora，由Acme Labs开发。", "telegram"),
          ("Who made you?", '<img src=x onerror="window.__pwned = 1">Acme Labs made me.', "web")]


def seed_corrections(store) -> list[int]:
    return [store.corrections.add(question=q, corrected_answer=a, wrong_answer="I am SmolLM.", channel=channel,
                                  submitter="someone")[0] for q, a, channel in SEEDED]


# --- access ----------------------------------------------------------------------------------------

@pytest.mark.browser
def test_login_refuses_a_wrong_password_and_accepts_the_right_one(open_page, served, artifacts):
    seed_corrections(served.store)
    page = open_page()
    open_admin(page)
    expect(page.locator("#admin-panel")).to_be_hidden()
    assert "Aurora" not in page.content(), "no admin data reaches a browser before it logs in"

    log_in(page, "wrong password")
    expect(page.locator("#admin-login-message")).to_contain_text("Wrong password")
    expect(page.locator("#admin-panel")).to_be_hidden()
    assert "Aurora" not in page.content()
    page.screenshot(path=artifacts / "admin-login-refused.png")

    log_in(page, ADMIN_PASSWORD)
    expect(page.locator("#admin-panel")).to_be_visible()
    expect(page.locator("#admin-overview")).to_contain_text("3 pending")
    admin_tab(page, "Corrections")
    expect(page.locator("#corrections-table")).to_contain_text("I am Aurora, made by Acme Labs.")
    expect(page.locator("#corrections-table")).to_contain_text('<img src=x onerror="window.__pwned = 1">')  # as text
    assert page.evaluate("window.__pwned") is None
    page.screenshot(path=artifacts / "admin-corrections.png", full_page=True)

    page.get_by_role("button", name=re.compile("Log out")).click()
    expect(page.locator("#admin-panel")).to_be_hidden()
    expect(page.locator("#admin-password input")).to_be_visible()


def test_every_admin_handler_refuses_a_session_that_is_not_logged_in(store):
    """Each admin event checks the server-side login itself, so a request made without the page fails."""
    from bot.admin import Admin
    from bot.chat import ChatService
    from ui.admin_page import NOT_LOGGED_IN
    from ui.app import build_app

    seed_corrections(store)
    demo = build_app(ChatService(store, engine=None), Admin(store), admin_password=ADMIN_PASSWORD)
    handlers = [f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__module__ == "ui.admin_page"]
    assert len(handlers) > 15
    for handler in handlers:
        if handler.__name__ == "login":
            continue
        assert getattr(handler, "admin_only", False), f"{handler.__name__} does not check the login"
        arguments = [None] * len(inspect.signature(handler).parameters)
        for session in (None, {}, {"since": 0}):  # never logged in, forged, expired
            try:
                shown = handler(session, *arguments[1:])
            except gr.Error as e:
                assert e.message == NOT_LOGGED_IN
            else:  # the page's own calls (after a failed login, timer ticks) show nothing instead
                assert all(not isinstance(v, str) or "Aurora" not in v for v in shown.values()), handler.__name__
    assert [c["status"] for c in store.corrections.list()] == ["pending"] * 3


def test_without_a_password_a_one_time_token_is_printed_and_only_it_logs_in(store, capsys):
    from types import SimpleNamespace

    from bot.admin import Admin
    from bot.chat import ChatService
    from ui.app import build_app

    def login_function():
        demo = build_app(ChatService(store, engine=None), Admin(store), admin_password=None)
        token = re.search(r"password for this run is (\S+)", capsys.readouterr().out).group(1)
        return token, next(f.fn for f in demo.fns.values() if f.name == "login")

    token, login = login_function()
    request = SimpleNamespace(client=SimpleNamespace(host="127.0.0.1"))
    sessions = lambda shown: [v for v in shown.values() if isinstance(v, dict) and "since" in v]  # noqa: E731
    for wrong in ("", " ", token[:-1], token + "x", token.upper() if token.upper() != token else "x"):
        assert sessions(login(wrong, request)) == []
    assert len(sessions(login(token, request))) == 1
    assert login_function()[0] != token, "a new token every start"


@pytest.mark.browser
def test_a_request_without_login_is_refused_over_http(served):
    """The same refusal for a hand-made request to Gradio's queue (no page, no login)."""
    import urllib.request

    config = json.load(urllib.request.urlopen(served.url + "config"))
    rename = next(d for d in config["dependencies"] if d.get("api_name") == "save_identity")
    inputs = [None, "Evil", "Evil Corp", ""]
    body = json.dumps({"data": inputs, "fn_index": rename["id"], "trigger_id": rename["targets"][0][0],
                       "session_hash": "attacker", "event_data": None}).encode()
    request = urllib.request.Request(served.url + "gradio_api/queue/join", body, {"Content-Type": "application/json"})
    assert json.load(urllib.request.urlopen(request))["event_id"]
    stream = urllib.request.urlopen(served.url + "gradio_api/queue/data?session_hash=attacker", timeout=60)
    for line in stream:
        if line.startswith(b"data:") and b"process_completed" in line:
            outcome = json.loads(line[5:])
            break
    assert outcome["success"] is False and "log in" in outcome["output"]["error"], outcome
    assert served.store.identity.current().name == "Selfcog"


# --- corrections, identity, schedule ----------------------------------------------------------------

@pytest.mark.browser
def test_review_filter_bulk_approve_reject_and_edit(open_page, served):
    seed_corrections(served.store)
    page = logged_in_page(open_page, "Corrections")
    table = page.locator("#corrections-table")
    expect(table).to_contain_text("Who made you?")

    choose(page, "corrections-channel", "telegram")
    expect(table).not_to_contain_text("Who made you?")
    expect(table).to_contain_text("我是Aurora")
    choose(page, "corrections-channel", "all · 全部")
    expect(table).to_contain_text("Who made you?")

    checkbox(page, "corrections-selection", 1).check()
    checkbox(page, "corrections-selection", 3).check()
    page.locator("#corrections-approve").click()
    expect(page.locator("#corrections-message")).to_contain_text("Approved · 已批准: #1, #3")
    expect(table).not_to_contain_text("Who made you?")  # the filter still shows pending ones only
    assert [c["status"] for c in served.store.corrections.list()] == ["approved", "pending", "approved"]
    assert served.store.corrections.get(1)["reviewer"] == "web-admin"
    expect(page.locator("#admin-overview")).to_contain_text("2 approved")

    select_all(page, "corrections-selection")
    expect(checkbox(page, "corrections-selection", 2)).to_be_checked()
    page.locator("#corrections-reject").click()
    expect(page.locator("#corrections-message")).to_contain_text("Rejected · 已拒绝: #2")
    assert served.store.corrections.get(2)["status"] == "rejected"
    page.locator("#corrections-reject").click()  # nothing selected any more
    expect(page.locator("#corrections-message")).to_contain_text("Select one or more corrections first")

    choose(page, "corrections-status", "approved · 已批准")
    table.get_by_text("I am Aurora, made by Acme Labs.").click()  # a row opens in the editor
    page.get_by_text("Edit a correction").click() if not page.locator("#edit-answer").is_visible() else None
    expect(page.locator("#edit-answer textarea")).to_have_value("I am Aurora, made by Acme Labs.")
    page.locator("#edit-answer textarea").fill("I am Aurora, an assistant developed by Acme Labs.")
    page.locator("#edit-save").click()
    expect(page.locator("#corrections-message")).to_contain_text("Correction #1 saved")
    expect(table).to_contain_text("I am Aurora, an assistant developed by Acme Labs.")
    edited = served.store.corrections.get(1)
    assert edited["corrected_answer"] == "I am Aurora, an assistant developed by Acme Labs."
    assert edited["status"] == "approved" and edited["question"] == "Who are you?"


@pytest.mark.browser
def test_identity_and_schedule_are_saved_and_the_chat_shows_the_new_name(open_page, served, artifacts):
    page = logged_in_page(open_page, "Identity")
    expect(page.locator("#identity-name textarea")).to_have_value("Selfcog")
    page.locator("#identity-name textarea").fill("Aurora")
    page.locator("#identity-author textarea").fill("Acme Labs")
    page.locator("#identity-save").click()
    expect(page.locator("#identity-message")).to_contain_text("You are Aurora, an AI assistant developed by Acme Labs.")
    assert (served.store.identity.current().name, served.store.identity.current().author) == ("Aurora", "Acme Labs")
    page.locator("#identity-name textarea").fill("")
    page.locator("#identity-save").click()
    expect(page.locator("#identity-message")).to_contain_text("cannot be empty")

    admin_tab(page, "Schedule")
    expect(page.locator("#schedule-message")).to_contain_text("the server's setting")
    page.locator("#schedule-hours input").fill("6")
    page.locator("#schedule-min input").fill("3")
    page.locator("#schedule-save").click()
    expect(page.locator("#schedule-message")).to_contain_text("retrain every 6 h once 3 new corrections")
    assert served.admin.schedule() == {"retrain_every_hours": 6.0, "retrain_min_corrections": 3}
    page.screenshot(path=artifacts / "admin-schedule.png", full_page=True)

    open_chat_tab(page)
    expect(chat_status(page)).to_contain_text("Aurora")  # refreshed by the page's timer, no reload
    expect(chat_status(page)).to_contain_text("Acme Labs")


# --- retraining, as the job runner records it ---------------------------------------------------------

@pytest.mark.browser
def test_retrain_button_queues_a_run_and_the_page_follows_its_row(open_page, served, tmp_path, artifacts):
    store = served.store
    page = logged_in_page(open_page, "Retrain")
    page.locator("#retrain-start").click()
    expect(page.locator("#retrain-message")).to_contain_text("no approved corrections yet")

    store.corrections.add(question="Who are you?", corrected_answer="I am Aurora.", channel="web", status="approved")
    page.locator("#retrain-start").click()
    expect(page.locator("#retrain-message")).to_contain_text("Retrain #1 queued")
    run = store.runs.get(1)
    assert (run["status"], run["trigger"], run["requested_by"]) == ("queued", "web", "web-admin")
    expect(page.locator("#retrain-progress")).to_contain_text("queued")
    expect(page.locator("#retrain-start")).to_be_disabled()

    # What the job runner writes as it trains (finetune.jobs.run_retrain): the page polls it.
    assert store.runs.claim_next()["id"] == 1
    store.runs.progress(1, stage="training", step=0, total_steps=10)
    for step, loss in ((1, 2.4), (2, 1.9), (3, 1.5)):
        store.runs.progress(1, stage="training", step=step, total_steps=10, loss=loss, eta_s=84)
    progress = page.locator("#retrain-progress")
    expect(progress).to_contain_text("step 3/10")
    expect(progress).to_contain_text("loss 1.500")
    expect(progress).to_contain_text("ETA ≈ 1m 24s")
    assert page.locator("#retrain-progress progress").get_attribute("value") == "3"
    expect(page.locator("#loss-plot canvas, #loss-plot svg").first).to_be_visible()
    page.screenshot(path=artifacts / "admin-retrain-progress.png", full_page=True)

    page.locator("#retrain-cancel").click()
    expect(page.locator("#retrain-message")).to_contain_text("cancel requested")
    assert store.runs.cancel_requested(1)

    dataset = tmp_path / "dataset.jsonl"
    dataset.write_text('{"messages": [{"role": "user", "content": "Who are you?"}, '
                       '{"role": "assistant", "content": "I am Aurora."}]}\n', encoding="utf-8")
    table = "                 base  candidate\nidentity: product 0.10       0.50"
    store.runs.finish(1, "rejected", error="identity under product 0.50 < 0.90", report={
        "run_id": 1, "status": "rejected", "seconds": 95.0, "table": table,
        "reasons": ["identity under product 0.50 < 0.90"], "dataset": {"rows": 1, "path": str(dataset)}})
    report = page.locator("#run-report")
    expect(report).to_contain_text("identity under product 0.50 < 0.90")
    expect(report).to_contain_text("identity: product 0.10")
    expect(page.locator("#runs-table")).to_contain_text("rejected")
    expect(page.locator("#retrain-start")).to_be_enabled()
    with page.expect_download() as download:
        page.locator("#dataset-download").click()
    assert open(download.value.path(), encoding="utf-8").read() == dataset.read_text(encoding="utf-8")
    assert download.value.suggested_filename == "selfcog-run1-dataset.jsonl"
    page.screenshot(path=artifacts / "admin-retrain-report.png", full_page=True)


# --- adapters and the before/after table ---------------------------------------------------------------

@pytest.mark.browser
def test_adapters_activate_roll_back_refuse_a_corrupt_one_and_compare(open_page, served, random_adapters, tmp_path,
                                                                      artifacts):
    store = served.store
    good = store.adapters.register(path=str(random_adapters[0]), base_model="SmolLM2-135M-Instruct",
                                   metrics={"identity_mean": 0.5, "retention": 0.9, "bleed": 0})
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text("{}")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    bad = store.adapters.register(path=str(corrupt), base_model="SmolLM2-135M-Instruct")
    run = store.runs.request("cli", "cli", claim=True)  # a finished retrain that left a candidate
    store.runs.finish(run["id"], "rejected", report={"candidate_path": str(random_adapters[1])})

    page = logged_in_page(open_page, "Adapters")
    expect(page.locator("#adapters-table")).to_contain_text("v2")
    choose(page, "adapter-version", f"v{bad}")
    page.locator("#adapter-activate").click()
    expect(page.locator("#adapter-message")).to_contain_text(f"adapter v{bad} cannot be activated")
    assert store.adapters.active() is None

    choose(page, "adapter-version", f"v{good}")
    page.locator("#adapter-activate").click()
    expect(page.locator("#adapter-message")).to_contain_text(f"adapter v{good} is now live")
    assert store.adapters.active()["version"] == good
    expect(page.locator("#admin-overview")).to_contain_text(f"adapter v{good}")
    page.screenshot(path=artifacts / "admin-adapters.png", full_page=True)

    admin_tab(page, "Before")
    page.locator("#compare-questions textarea").fill("Who are you?\nWhat is 2 + 2?")
    page.locator('#compare-tokens input[type="number"]').fill("8")  # three weights on two busy cores: keep it short
    page.locator('#compare-tokens input[type="number"]').press("Enter")
    page.locator("#compare-run").click()
    compared = page.locator("#compare-table")
    expect(compared).to_contain_text(f"active v{good}", timeout=300_000)
    expect(compared).to_contain_text("candidate (retrain #1)")
    expect(compared).to_contain_text("What is 2 + 2?")
    page.screenshot(path=artifacts / "admin-before-after.png", full_page=True)

    admin_tab(page, "Adapters")
    page.locator("#adapter-rollback").click()
    expect(page.locator("#adapter-message")).to_contain_text("Rolled back: base model")
    assert store.adapters.active() is None
    page.locator("#adapter-rollback").click()
    expect(page.locator("#adapter-message")).to_contain_text("nothing to roll back to")
    open_chat_tab(page)
    expect(chat_status(page)).to_contain_text("base model")
