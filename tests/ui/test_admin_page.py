"""The admin page in headless Chromium: login, review, identity, schedule, retrain progress, adapters.

The retrain here is played by the test writing the run's row the way the job runner does, so the
page's side (request, progress bar, loss curve, report, download, cancel) is checked in seconds;
test_retrain_from_the_page.py runs a real retrain through the real job runner.
"""

from __future__ import annotations

import inspect
import json
import re
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import gradio as gr
import pytest
from playwright.sync_api import expect

from bot.run_summary import summarize
from tests.ui.conftest import ADMIN_PASSWORD, THROTTLE_FREE
from ui.sessions import COOKIE
from tests.ui.pages import admin_tab, chat_status, checkbox, choose, fill_number, log_in, logged_in_page, open_admin, \
    open_chat_tab, select_all, two_frames

SEEDED = [("Who are you?", "I am Aurora, made by Acme Labs.", "web"),
          ("你是谁？", "我是Aurora，由Acme Labs开发。", "telegram"),
          ("Who made you?", '<img src=x onerror="window.__pwned = 1">Acme Labs made me.', "web")]


def seed_corrections(store) -> list[int]:
    return [store.corrections.add(question=q, corrected_answer=a, wrong_answer="I am SmolLM.", channel=channel,
                                  submitter="someone")[0] for q, a, channel in SEEDED]


# --- access ----------------------------------------------------------------------------------------

@pytest.mark.browser
def test_login_refuses_a_wrong_password_and_the_session_lives_in_an_httponly_cookie(open_page, served, artifacts):
    seed_corrections(served.store)
    page = open_page()
    open_admin(page)
    expect(page.locator("#admin-panel")).to_be_hidden()
    assert "Aurora" not in page.content(), "no admin data reaches a browser before it logs in"

    log_in(page, "wrong password")
    expect(page.locator("#admin-login-message")).to_contain_text("Wrong password")
    expect(page.locator("#admin-panel")).to_be_hidden()
    assert "Aurora" not in page.content() and page.context.cookies() == []
    page.screenshot(path=artifacts / "admin-login-refused.png")

    log_in(page, ADMIN_PASSWORD)
    expect(page.locator("#admin-panel")).to_be_visible()
    expect(page.locator("#admin-overview")).to_contain_text("3 pending")
    [cookie] = page.context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["expires"]) == (
        COOKIE, True, "Strict", -1), cookie  # a session cookie: it goes when the browser closes
    assert COOKIE not in page.evaluate("document.cookie"), "page scripts cannot read it"
    admin_tab(page, "Corrections")
    expect(page.locator("#corrections-table")).to_contain_text("I am Aurora, made by Acme Labs.")
    expect(page.locator("#corrections-table")).to_contain_text('<img src=x onerror="window.__pwned = 1">')  # as text
    assert page.evaluate("window.__pwned") is None
    page.screenshot(path=artifacts / "admin-corrections.png", full_page=True)

    page.reload()  # the login survives a reload
    page.get_by_role("tab", name=re.compile("Admin")).click()
    expect(page.locator("#admin-panel")).to_be_visible()
    expect(page.locator("#admin-overview")).to_contain_text("3 pending")

    page.get_by_role("button", name=re.compile("Log out")).click()
    expect(page.locator("#admin-panel")).to_be_hidden()
    expect(page.locator("#admin-password input")).to_be_visible()
    assert page.context.cookies() == []
    page.reload()
    open_admin(page)
    expect(page.locator("#admin-panel")).to_be_hidden()


@pytest.mark.browser
def test_another_browser_with_the_same_session_hash_is_not_admin(open_page, served, caplog):
    """Gradio's session_hash travels in URLs; knowing it must grant nothing without the session cookie."""
    admin = logged_in_page(open_page, "Identity")
    with admin.expect_request(re.compile("queue/join")) as joined:
        admin.locator("#identity-save").click()
    session_hash = joined.value.post_data_json["session_hash"]
    expect(admin.locator("#identity-message")).to_contain_text("Saved")

    other = open_page()  # another browser: no cookie
    events = other.request.get(served.url + f"gradio_api/queue/data?session_hash={session_hash}")
    assert events.status == 403, "the admin page's events are not readable with its session_hash alone"
    evil = [None, "Evil", "Evil Corp", ""]
    outcome = call_event(other, served.url, "identity-save", evil, "a-hash-of-its-own")
    assert outcome["success"] is False and "log in" in outcome["output"]["error"], outcome
    call_event(other, served.url, "identity-save", evil, session_hash, read=False)  # the admin's own hash
    wait_until(lambda: len(refusals(caplog)) == 2)
    assert all(r.exc_info is None for r in refusals(caplog)), "one line each, no traceback"
    assert served.store.identity.current().name == "Selfcog"
    assert other.request.get(served.url + "admin/download/dataset").status == 403
    expect(admin.locator("#admin-panel")).to_be_visible()  # the admin's own page is still logged in


def refusals(caplog) -> list:
    return [r for r in caplog.records if "refused admin call" in r.getMessage()]


def wait_until(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def call_event(page, url: str, elem_id: str, inputs: list, session_hash: str, read: bool = True) -> dict | None:
    """Call the click event of the button elem_id through Gradio's queue, as a hand-made request from
    page's browser; returns its completion message (read=False: does not wait for it)."""
    config = page.request.get(url + "config").json()
    button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)
    event = next(d for d in config["dependencies"] if [button, "click"] in d["targets"])
    joined = page.request.post(url + "gradio_api/queue/join", data={
        "data": inputs, "fn_index": event["id"], "trigger_id": button, "session_hash": session_hash,
        "event_data": None})
    assert joined.ok, joined.text()
    if not read:
        return None
    for line in page.request.get(url + f"gradio_api/queue/data?session_hash={session_hash}").text().splitlines():
        if line.startswith("data:") and '"process_completed"' in line:
            return json.loads(line[5:])
    raise AssertionError("the event never completed")


@pytest.mark.browser
def test_wrong_passwords_make_the_client_wait(open_page, served):
    page = open_page()
    open_admin(page)
    for attempt in range(THROTTLE_FREE + 1):
        log_in(page, f"guess {attempt}")
        expect(page.locator("#admin-login-message")).to_contain_text("Wrong password")
        expect(page.locator("#admin-password input")).to_have_value("")  # ready for the next try
    log_in(page, ADMIN_PASSWORD)  # right, but too soon
    expect(page.locator("#admin-login-message")).to_contain_text(re.compile(r"Too many attempts — wait \d+ s"))
    expect(page.locator("#admin-panel")).to_be_hidden()


def test_every_admin_handler_refuses_a_request_without_a_live_session(store, caplog):
    """Each admin event checks the session cookie itself, so a request made without the page fails."""
    from bot.admin import Admin
    from bot.chat import ChatService
    from ui.admin_page import NOT_LOGGED_IN
    from ui.app import build_app
    from ui.sessions import AdminSessions

    seed_corrections(store)
    sessions = AdminSessions(ADMIN_PASSWORD)
    ended = sessions.log_in(ADMIN_PASSWORD, client="test")
    sessions.end(ended)
    engine = SimpleNamespace(capacity=4)
    demo = build_app(ChatService(store, engine), Admin(store), sessions=sessions).state.blocks
    handlers = [f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__module__ == "ui.admin_page"]
    page_events = {"login_done", "page_load", "logout_done"}  # show the panel only with a live session
    assert len(handlers) > 15
    for cookies in ({}, {COOKIE: "forged"}, {COOKIE: ended}):
        request = SimpleNamespace(cookies=cookies, client=SimpleNamespace(host="203.0.113.7"))
        for handler in handlers:
            arguments = [None] * (len(inspect.signature(handler).parameters) - 1)
            if handler.__name__ in page_events:
                shown = handler(*arguments, request)
            else:
                assert getattr(handler, "admin_only", False), f"{handler.__name__} does not check the session"
                try:
                    shown = handler(request, *arguments)
                except gr.Error as e:
                    assert e.message == NOT_LOGGED_IN
                    continue
            # the page's own calls (loads, timer ticks) show nothing instead
            assert all(not isinstance(v, str) or "Aurora" not in v for v in shown.values()), handler.__name__
            assert not any(isinstance(v, gr.Column) and v.visible is True for v in shown.values()), handler.__name__
    assert [c["status"] for c in store.corrections.list()] == ["pending"] * 3
    refusals = [r for r in caplog.records if "refused admin call" in r.getMessage()]
    assert len(refusals) == 3 * (len(handlers) - len(page_events)) and all(r.exc_info is None for r in refusals)


def test_login_sets_a_strict_httponly_cookie_and_a_one_time_token_is_printed(store, capsys):
    from fastapi.testclient import TestClient

    from bot.admin import Admin
    from bot.chat import ChatService
    from ui.app import build_app

    def start():
        app = build_app(ChatService(store, SimpleNamespace(capacity=4)), Admin(store), admin_password=None)
        return TestClient(app), re.search(r"password for this run is (\S+)", capsys.readouterr().out).group(1)

    client, token = start()
    for wrong in ("", " ", token[:-1], token + "x"):
        answer = client.post("/admin/login", json={"password": wrong})
        assert answer.status_code == 401 and answer.json()["message"].startswith("Wrong password")
    assert client.get("/admin/download/dataset").status_code == 403
    answer = client.post("/admin/login", json={"password": token})
    assert answer.status_code == 200
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Max-Age" not in cookie and "expires" not in cookie.lower()
    assert client.get("/admin/download/dataset").status_code == 404  # allowed; no retrain has left a training set
    client.post("/admin/logout")
    assert client.get("/admin/download/dataset").status_code == 403
    assert start()[1] != token, "a new token every start"


def test_backoff_doubles_the_wait_after_the_free_tries_per_key():
    from ui.sessions import Backoff

    backoff = Backoff(free=2, first_wait_s=10, max_wait_s=25, forget_s=3600)
    for now in (0, 1):
        backoff.failed("a", now)
        assert backoff.wait_left("a", now) == 0
    backoff.failed("a", 2)
    assert backoff.wait_left("a", 2) == 10 and backoff.wait_left("a", 7) == 5 and backoff.wait_left("a", 12) == 0
    backoff.failed("a", 12)
    assert backoff.wait_left("a", 12) == 20
    backoff.failed("a", 40)
    assert backoff.wait_left("a", 40) == 25  # capped
    assert backoff.wait_left("b", 40) == 0  # another client
    assert backoff.wait_left("a", 40 + 3601) == 0  # forgotten after an hour
    backoff.succeeded("a")
    assert backoff.wait_left("a", 41) == 0


def test_sessions_end_when_idle_or_too_old_and_the_timer_does_not_keep_them():
    from ui.sessions import AdminSessions

    now = [0.0]
    sessions = AdminSessions("pw", idle_s=60, max_age_s=600, clock=lambda: now[0])
    token = sessions.log_in("pw", client="x")
    for now[0] in (50, 100, 150, 200):  # an admin action every 50 s
        assert sessions.active(token)
    now[0] = 250
    assert sessions.active(token, touch=False)  # a timer tick does not count as activity...
    now[0] = 261
    assert not sessions.active(token)  # ...so 61 s after the last action the session is gone
    token = sessions.log_in("pw", client="x")
    for now[0] in range(300, 870, 50):
        assert sessions.active(token)
    now[0] = 870
    assert not sessions.active(token), "twelve hours (here 600 s) at most"


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
    expect(page.locator("#edit-answer textarea")).to_have_value("I am Aurora, made by Acme Labs.")
    two_frames(page)  # the editor's accordion mounted just now (once in CI the typed answer was overwritten)
    page.locator("#edit-answer textarea").fill("I am Aurora, an assistant developed by Acme Labs.")
    expect(page.locator("#edit-answer textarea")).to_have_value("I am Aurora, an assistant developed by Acme Labs.")
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
    expect(page.locator("#identity-message")).to_contain_text("The name is empty")

    admin_tab(page, "Schedule")
    expect(page.locator("#schedule-message")).to_contain_text("the server's setting")
    # Leave each field before saving, as a person does: a quick click once saved what a field held
    # before (seen once in CI: "the interval is a number ...").
    fill_number(page, "#schedule-hours input", "6")
    fill_number(page, "#schedule-min input", "3")
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
    expect(page.locator("#retrain-message")).to_contain_text("no approved corrections")

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
    expect(progress).to_contain_text("Retrain #1: training, step 3/10 (30%), loss 1.500, about 1 min 24 s left.")
    assert page.locator("#retrain-progress progress").get_attribute("value") == "30"
    expect(page.locator("#loss-plot canvas, #loss-plot svg").first).to_be_visible()
    page.screenshot(path=artifacts / "admin-retrain-progress.png", full_page=True)

    page.locator("#retrain-cancel").click()
    expect(page.locator("#retrain-message")).to_contain_text("cancel requested")
    assert store.runs.cancel_requested(1)

    dataset = tmp_path / "dataset.jsonl"
    dataset.write_text('{"messages": [{"role": "user", "content": "Who are you?"}, '
                       '{"role": "assistant", "content": "I am Aurora."}]}\n', encoding="utf-8")
    table = "                 base  candidate\nidentity: product 0.10       0.50"
    reasons = ["identity under product 0.50 < 0.90", "identity under none 0.20 < 0.80"]
    store.runs.finish(1, "rejected", error="; ".join(reasons), report={
        "run_id": 1, "status": "rejected", "seconds": 95.0, "table": table, "reasons": reasons,
        "dataset": {"rows": 1, "path": str(dataset)}})
    expect(progress).to_contain_text(summarize(store.runs.get(1)).outcome_line)  # the whole line, what to do included
    assert progress.locator("#retrain-state").get_attribute("data-ok") == "false"  # a red bar, not a green one
    report = page.locator("#run-report")
    expect(report).to_contain_text("identity under none 0.20 < 0.80")  # every reason
    expect(report).to_contain_text("identity: product 0.10")
    expect(report).to_contain_text("Took 1 min 35 s")
    expect(page.locator("#runs-table")).to_contain_text("rejected")
    expect(page.locator("#retrain-start")).to_be_enabled()
    with page.expect_download() as download:
        page.locator("#dataset-download").click()
    assert open(download.value.path(), encoding="utf-8").read() == dataset.read_text(encoding="utf-8")
    assert download.value.suggested_filename == "selfcog-run1-dataset.jsonl"
    page.screenshot(path=artifacts / "admin-retrain-report.png", full_page=True)
    stranger = urllib.request.Request(served.url + "admin/download/dataset")
    with pytest.raises(urllib.error.HTTPError, match="403"):  # no session cookie: no training set
        urllib.request.urlopen(stranger)


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
