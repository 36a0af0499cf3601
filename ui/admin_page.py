"""The admin page: identity, the corrections queue, retraining, adapters, before/after, schedule.

Nothing here shows or changes anything until the session has logged in with the admin password.
The login lives in server-side ``gr.State`` (a browser cannot set it), and every handler goes
through ``admin_only``, which checks it again: a request crafted without the page is refused too.

Retraining never runs here. The page asks for it through ``Admin.request_retrain`` (the same call
Telegram's /retrain makes); the job runner in ``selfcog serve`` claims it and writes progress to the
run's row, which a ``gr.Timer`` polls every couple of seconds, so the page never waits on training.

Components are declared in page order; the handlers follow; the event wiring is at the end.
Handlers return ``{component: value}`` dicts, so each updates only what it changed.
"""

from __future__ import annotations

import functools
import hmac
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import gradio as gr

from bot.admin import Admin
from bot.chat import ChatInputError, ChatService
from bot.engine import AdapterRef, EngineError
from store import StoreError
from ui import views

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often the page looks at the retrain's row
SESSION_TTL_S = 12 * 3600  # a login lasts this long
REVIEWER = "web-admin"
COMPARE_MAX_NEW_TOKENS = 64  # identity shows in the first sentence; keeps the table quick on a CPU
MAX_COMPARE_QUESTIONS = 20
DEFAULT_QUESTIONS = ["Who are you?", "你是谁？", "Who made you?", "What is your name?",
                     "What is the capital of France?", "一年有几个月？", "What is 7 times 8?"]
STATUS_FILTERS = [("pending · 待审", "pending"), ("approved · 已批准", "approved"), ("rejected · 已拒绝", "rejected"),
                  ("all · 全部", "all")]
CHANNEL_FILTERS = [("all · 全部", "all"), ("web", "web"), ("telegram", "telegram"), ("cli", "cli"),
                   ("import", "import")]
NOT_LOGGED_IN = "Please log in first: admin actions need the admin password. · 请先登录：管理操作需要管理员密码。"


def admin_only(fn=None, *, refused: Callable[[], dict] | None = None):
    """Run the handler only for a logged-in session (its first argument); refuse it otherwise.

    A refused call raises gr.Error(NOT_LOGGED_IN), or, for calls the page makes by itself (after a
    failed login, on a timer tick), returns what refused() says to show instead."""
    if fn is None:
        return functools.partial(admin_only, refused=refused)

    @functools.wraps(fn)
    def checked(session, *args, **kwargs):
        if not logged_in(session):
            if refused is not None:
                return refused()
            raise gr.Error(NOT_LOGGED_IN, title="Not logged in · 未登录")
        return fn(session, *args, **kwargs)

    checked.admin_only = True
    return checked


def logged_in(session: dict | None) -> bool:
    return isinstance(session, dict) and time.time() - session.get("since", 0) < SESSION_TTL_S


def admin_page(chat: ChatService, admin: Admin, *, password: str) -> None:
    """Build the admin page inside the current gr.Blocks."""
    if not password:
        raise ValueError("the admin page needs a password (build_app makes a one-time token when none is set)")
    downloads = Path(tempfile.mkdtemp(prefix="selfcog-downloads-"))  # Gradio serves files from the temp dir

    # --- login ----------------------------------------------------------------------------------
    with gr.Row(equal_height=True) as login_box:
        password_box = gr.Textbox(label="Admin password · 管理员密码", type="password", scale=4,
                                  elem_id="admin-password", placeholder="SELFCOG_ADMIN_PASSWORD")
        login_button = gr.Button("🔐 Log in · 登录", variant="primary", scale=1, elem_id="admin-login")
    login_message = gr.Markdown(elem_id="admin-login-message")

    with gr.Column(visible=False, elem_id="admin-panel") as panel:
        with gr.Row(equal_height=True):
            overview = gr.Markdown(elem_id="admin-overview")
            logout_button = gr.Button("Log out · 退出", size="sm", scale=0, elem_id="admin-logout")

        with gr.Tabs():
            # --- identity ---------------------------------------------------------------------------
            with gr.Tab("Identity · 身份", id="identity"):
                with gr.Row():
                    name = gr.Textbox(label="Name · 名字", max_length=64, elem_id="identity-name")
                    author = gr.Textbox(label="Developer · 开发者", max_length=128, elem_id="identity-author")
                description = gr.Textbox(label="Description (optional) · 描述（可选）", lines=2, max_length=1000,
                                         elem_id="identity-description")
                save_identity_button = gr.Button("Save identity · 保存身份", variant="primary", elem_id="identity-save")
                identity_message = gr.Markdown(elem_id="identity-message")

            # --- corrections ------------------------------------------------------------------------
            with gr.Tab("Corrections · 纠正", id="corrections"):
                with gr.Row(equal_height=True):
                    status_filter = gr.Dropdown(STATUS_FILTERS, value="pending", label="Status · 状态",
                                                elem_id="corrections-status")
                    channel_filter = gr.Dropdown(CHANNEL_FILTERS, value="all", label="Channel · 渠道",
                                                 elem_id="corrections-channel")
                    refresh_button = gr.Button("🔄 Refresh · 刷新", size="sm", scale=0)
                corrections_table = gr.Dataframe(interactive=False, wrap=True, max_height=360,
                                                 label="Corrections (click a row to edit it) · 纠正列表（点击一行可编辑）",
                                                 elem_id="corrections-table")
                selection = gr.CheckboxGroup(label="Select for a bulk action · 选择以批量操作", choices=[],
                                             show_select_all=True, elem_id="corrections-selection")
                with gr.Row():
                    approve_button = gr.Button("✅ Approve · 批准", variant="primary", elem_id="corrections-approve")
                    reject_button = gr.Button("🚫 Reject · 拒绝", variant="stop", elem_id="corrections-reject")
                    pending_button = gr.Button("↩️ Back to pending · 退回待审")
                review_message = gr.Markdown(elem_id="corrections-message")
                with gr.Accordion("Edit a correction · 编辑纠正", open=False, elem_id="correction-edit"):
                    edit_id = gr.Number(label="Correction # · 编号", precision=0, elem_id="edit-id")
                    edit_question = gr.Textbox(label="Question · 问题", lines=2, elem_id="edit-question")
                    edit_answer = gr.Textbox(label="Correct answer · 正确回答", lines=3, elem_id="edit-answer")
                    save_edit_button = gr.Button("Save edit · 保存修改", elem_id="edit-save")

            # --- retraining -------------------------------------------------------------------------
            with gr.Tab("Retrain · 重训", id="retrain"):
                with gr.Row():
                    retrain_button = gr.Button("🚀 Retrain now · 立即重训", variant="primary", elem_id="retrain-start")
                    cancel_button = gr.Button("⏹️ Cancel · 取消", variant="stop", elem_id="retrain-cancel")
                retrain_message = gr.Markdown(elem_id="retrain-message")
                progress = gr.HTML(views.progress_html(None), elem_id="retrain-progress")
                loss_plot = gr.LinePlot(views.losses_frame([]), x="step", y="loss", title="Training loss · 训练损失",
                                        height=260, elem_id="loss-plot")
                report = gr.Markdown(elem_id="run-report")
                dataset_button = gr.DownloadButton("⬇️ Training set (ms-swift JSONL) · 下载训练集", visible=False,
                                                   elem_id="dataset-download", size="sm")
                runs_table = gr.Dataframe(interactive=False, label="Runs · 历史", max_height=300, elem_id="runs-table")

            # --- adapters ---------------------------------------------------------------------------
            with gr.Tab("Adapters · 适配器", id="adapters"):
                adapters_table = gr.Dataframe(interactive=False, label="Adapter versions · 适配器版本",
                                              elem_id="adapters-table")
                with gr.Row(equal_height=True):
                    version = gr.Dropdown(label="Version · 版本", choices=[], elem_id="adapter-version")
                    activate_button = gr.Button("Activate · 启用", variant="primary", elem_id="adapter-activate")
                    rollback_button = gr.Button("↩️ Roll back · 回滚", elem_id="adapter-rollback")
                adapter_message = gr.Markdown(elem_id="adapter-message")

            # --- before / after ---------------------------------------------------------------------
            with gr.Tab("Before / after · 对比", id="compare"):
                questions = gr.Textbox("\n".join(DEFAULT_QUESTIONS), lines=7, elem_id="compare-questions",
                                       label="Questions, one a line · 问题（每行一个）")
                with gr.Row(equal_height=True):
                    compare_tokens = gr.Slider(8, 256, value=COMPARE_MAX_NEW_TOKENS, step=8, elem_id="compare-tokens",
                                               label="Answer length, tokens (longer is slower) · 回答长度（越长越慢）")
                    compare_button = gr.Button("Compare base / active / candidate · 对比", variant="primary",
                                               elem_id="compare-run")
                compare_message = gr.Markdown(elem_id="compare-message")
                compare_table = gr.Dataframe(interactive=False, wrap=True, elem_id="compare-table")

            # --- schedule ---------------------------------------------------------------------------
            with gr.Tab("Schedule · 计划", id="schedule"):
                with gr.Row():
                    every_hours = gr.Number(label="Retrain every N hours (0 = off) · 每 N 小时重训（0 = 关闭）",
                                            minimum=0, elem_id="schedule-hours")
                    min_corrections = gr.Number(label="…when at least N new approved corrections · 至少 N 条新批准的纠正",
                                                precision=0, minimum=1, elem_id="schedule-min")
                save_schedule_button = gr.Button("Save schedule · 保存计划", elem_id="schedule-save")
                schedule_message = gr.Markdown(elem_id="schedule-message")

    session = gr.State(None)  # {"since": login time} once logged in; server-side, per browser session
    seen = gr.State(None)  # the facts the page shows now; a poll that finds them unchanged sends nothing
    poll_timer = gr.Timer(POLL_S, active=False)

    # --- handlers: what each part shows -------------------------------------------------------------
    def current_run() -> dict | None:
        """The active retrain, else the last finished one. Read-only, unlike Admin.retrain_status(), which
        also marks dead runs failed (a write lock): the page calls that at login, not on every poll."""
        return admin.store.runs.active() or admin.store.runs.last_finished()

    def live_facts() -> tuple:
        run = current_run()
        run_facts = tuple(run.get(k) for k in ("id", "status", "stage", "step", "loss", "cancel_requested")) if run else None
        active = admin.store.adapters.active()
        return (run_facts, active["version"] if active else None, chat.status()["adapter_version"],
                len(admin.adapters()), admin.store.corrections.count("pending"), admin.store.corrections.count("approved"))

    def overview_view() -> dict:
        store = admin.store
        return {overview: views.overview(chat.status(), store.corrections.count("pending"),
                                         store.corrections.count("approved"), current_run())}

    def retrain_view() -> dict:
        run = current_run()
        busy = run is not None and run["status"] in ("queued", "running")
        return {progress: views.progress_html(run),
                loss_plot: views.losses_frame(admin.store.runs.losses(run["id"]) if run else []),
                report: views.run_report(run) if run and not busy else "",
                runs_table: views.runs_frame(admin.store.runs.list(limit=20)),
                retrain_button: gr.Button(interactive=not busy), cancel_button: gr.Button(interactive=busy),
                dataset_button: dataset_download()}

    def dataset_download():
        found = admin.recent_run_file("dataset")
        if found is None:
            return gr.DownloadButton(visible=False)
        run, path = found
        copy = downloads / f"selfcog-run{run['id']}-dataset.jsonl"
        if not copy.exists():
            shutil.copyfile(path, copy)
        return gr.DownloadButton(f"⬇️ Training set of retrain #{run['id']} (ms-swift JSONL) · 下载训练集",
                                 value=str(copy), visible=True)

    def adapters_view(pick_live: bool = True) -> dict:
        """The versions table and picker; pick_live=False leaves the admin's pick alone (timer refreshes)."""
        rows = admin.adapters()
        live = next((r["version"] for r in rows if r["active"]), None)
        choices = [("base model · 基础模型", "base")] + [(f"v{r['version']}", str(r["version"])) for r in rows]
        picker = gr.Dropdown(choices=choices, value=str(live or "base")) if pick_live else gr.Dropdown(choices=choices)
        return {adapters_table: views.adapters_frame(rows), version: picker}

    def corrections_view(status: str, channel: str, selected: list[int] | None = None) -> dict:
        rows = admin.corrections(status=None if status == "all" else status,
                                 channel=None if channel == "all" else channel, limit=500)
        shown = {r["id"] for r in rows}
        return {corrections_table: views.corrections_frame(rows),
                selection: gr.CheckboxGroup(choices=views.correction_choices(rows),
                                            value=[i for i in selected or [] if i in shown])}

    def identity_view() -> dict:
        profile = chat.profile()
        return {name: profile.name, author: profile.author, description: profile.description}

    def schedule_view() -> dict:
        schedule = admin.schedule()
        return {every_hours: schedule["retrain_every_hours"], min_corrections: schedule["retrain_min_corrections"],
                schedule_message: "" if None not in schedule.values() else
                "Blank fields: the server's setting (SELFCOG_RETRAIN_EVERY_HOURS / _MIN_CORRECTIONS) applies. · "
                "空白：使用服务器的设置。"}

    # --- handlers: login -------------------------------------------------------------------------
    def login(given: str, request: gr.Request):
        """Check the password (in constant time); on success show the panel and start polling."""
        if not hmac.compare_digest((given or "").encode(), password.encode()):
            log.warning("refused an admin login from %s", getattr(request.client, "host", "?"))
            return {session: None, password_box: "", panel: gr.Column(visible=False),
                    login_message: "❌ Wrong password: access refused. · 密码错误，拒绝访问。"}
        log.info("admin logged in from %s", getattr(request.client, "host", "?"))
        return {session: {"since": time.time()}, password_box: "", login_box: gr.Row(visible=False),
                panel: gr.Column(visible=True), poll_timer: gr.Timer(active=True),
                login_message: "✅ Logged in · 已登录"}

    @admin_only(refused=lambda: {seen: gr.skip()})  # after a failed login: nothing to load
    def load_everything(_session, status: str, channel: str):
        admin.retrain_status()  # a retrain whose process died shows as failed from here on
        return {seen: live_facts(), **overview_view(), **identity_view(), **corrections_view(status, channel),
                **retrain_view(), **adapters_view(), **schedule_view()}

    def logged_out_view(message: str = "Logged out · 已退出") -> dict:
        return {session: None, login_box: gr.Row(visible=True), panel: gr.Column(visible=False),
                poll_timer: gr.Timer(active=False), login_message: message}

    @admin_only
    def logout(_session):
        return logged_out_view()

    @admin_only(refused=lambda: logged_out_view("Your admin session expired: please log in again. · 登录已过期，请重新登录。"))
    def poll(_session, shown: tuple | None):
        """Every POLL_S: progress, loss curve, report and lists, when anything changed."""
        facts = live_facts()
        if facts == shown:
            return {seen: gr.skip()}  # (an empty dict would not mean "no change" to Gradio)
        return {seen: facts, **overview_view(), **retrain_view(), **adapters_view(pick_live=False)}

    # --- handlers: identity ----------------------------------------------------------------------
    @admin_only
    def save_identity(_session, new_name: str, new_author: str, new_description: str):
        try:
            profile = admin.set_identity(name=new_name, author=new_author, description=new_description, by=REVIEWER)
        except StoreError as e:
            return {identity_message: f"⚠️ {e}"}
        return {identity_message: f"✅ Saved · 已保存. The bot now serves under: *{chat.system_prompt()}* "
                                  f"Retrain so {profile.name} also answers as itself without it. · 重训后身份才会写入模型。",
                **overview_view()}

    # --- handlers: corrections -------------------------------------------------------------------
    @admin_only
    def list_corrections(_session, status: str, channel: str, selected: list[int]):
        return corrections_view(status, channel, selected)

    def review(selected: list[int], new_status: str, status: str, channel: str) -> dict:
        if not selected:
            return {review_message: "⚠️ Select one or more corrections first. · 请先选择纠正。"}
        try:
            ids = admin.review(list(selected), new_status, reviewer=REVIEWER)
        except StoreError as e:
            return {review_message: f"⚠️ {e}"}
        done = {"approved": "✅ Approved · 已批准", "rejected": "🚫 Rejected · 已拒绝", "pending": "↩️ Back to pending · 已退回"}
        return {review_message: f"{done[new_status]}: " + ", ".join(f"#{i}" for i in ids),
                **corrections_view(status, channel), **overview_view()}

    @admin_only
    def approve(_session, selected: list[int], status: str, channel: str):
        return review(selected, "approved", status, channel)

    @admin_only
    def reject(_session, selected: list[int], status: str, channel: str):
        return review(selected, "rejected", status, channel)

    @admin_only
    def back_to_pending(_session, selected: list[int], status: str, channel: str):
        return review(selected, "pending", status, channel)

    @admin_only
    def pick_correction(_session, data: gr.SelectData):
        """A click on a row of the table opens that correction in the editor."""
        try:
            row = admin.store.corrections.get(int(data.row_value[0]))
        except (StoreError, TypeError, ValueError, IndexError):
            return {edit_id: gr.skip()}
        return {edit_id: row["id"], edit_question: row["question"], edit_answer: row["corrected_answer"]}

    @admin_only
    def save_edit(_session, correction_id: float | None, question: str, answer: str, status: str, channel: str,
                  selected: list[int]):
        if not correction_id:
            return {review_message: "⚠️ Click a correction in the table first. · 请先在表格中点击一条纠正。"}
        try:
            row = admin.edit_correction(int(correction_id), question=question, answer=answer, by=REVIEWER)
        except StoreError as e:
            return {review_message: f"⚠️ {e}"}
        return {review_message: f"✏️ Correction #{row['id']} saved · 已保存", **corrections_view(status, channel, selected)}

    # --- handlers: retraining --------------------------------------------------------------------
    @admin_only
    def retrain(_session):
        try:
            run = admin.request_retrain(trigger="web", requested_by=REVIEWER)
        except StoreError as e:  # none approved yet, or one already queued/running
            return {retrain_message: f"⚠️ {e}"}
        return {retrain_message: f"🚀 Retrain #{run['id']} queued; progress shows below. · 已排队，进度见下方。",
                **retrain_view()}

    @admin_only
    def cancel(_session):
        try:
            run = admin.cancel_retrain(by=REVIEWER)
        except StoreError as e:
            return {retrain_message: f"⚠️ {e}"}
        outcome = "cancelled · 已取消" if run["status"] == "cancelled" else "cancel requested · 正在取消"
        return {retrain_message: f"⏹️ Retrain #{run['id']}: {outcome}", **retrain_view()}

    # --- handlers: adapters ----------------------------------------------------------------------
    @admin_only
    def activate(_session, chosen: str | None):
        if not chosen:
            return {adapter_message: "⚠️ Pick a version first. · 请先选择版本。"}
        try:
            row = admin.activate(None if chosen == "base" else int(chosen), by=REVIEWER)
        except StoreError as e:  # unknown version, or a folder that won't load
            return {adapter_message: f"⚠️ {e}"}
        return {adapter_message: f"✅ {views.adapter_name(row['version'] if row else None)} is now live; the chat "
                                 "switches within seconds. · 已启用，聊天将在几秒内切换。",
                **adapters_view(), **overview_view()}

    @admin_only
    def rollback(_session):
        try:
            row = admin.rollback(by=REVIEWER)
        except StoreError as e:
            return {adapter_message: f"⚠️ {e}"}
        return {adapter_message: f"↩️ Rolled back: {views.adapter_name(row['version'] if row else None)} is live "
                                 "again. · 已回滚。", **adapters_view(), **overview_view()}

    # --- handlers: before / after ----------------------------------------------------------------
    @admin_only
    def compare(_session, text: str, max_new_tokens: float):
        """Answer the questions with the base model, the live adapter and the last run's candidate."""
        asked = [q.strip() for q in (text or "").splitlines() if q.strip()]
        weights = {"base": AdapterRef.BASE}
        live = chat.status()["adapter_version"]
        if live:
            weights[f"active v{live}"] = AdapterRef.ACTIVE
        found = admin.recent_run_file("candidate")
        if found:
            weights[f"candidate (retrain #{found[0]['id']})"] = str(found[1])
        notes = [] if live else ["No adapter is live, so base is also what serves. · 当前无适配器。"]
        if not found:
            notes.append("No retrain has left a candidate yet. · 暂无候选适配器。")
        if len(asked) > MAX_COMPARE_QUESTIONS:
            notes.append(f"Only the first {MAX_COMPARE_QUESTIONS} questions were asked. · 只比较前 {MAX_COMPARE_QUESTIONS} 个问题。")
        try:
            rows = chat.compare(asked[:MAX_COMPARE_QUESTIONS], weights,
                                max_new_tokens=int(max_new_tokens or COMPARE_MAX_NEW_TOKENS))
        except ChatInputError as e:
            return {compare_message: f"⚠️ {e}"}
        except (EngineError, OSError, ValueError) as e:  # e.g. a candidate folder deleted or corrupt meanwhile
            return {compare_message: f"⚠️ The comparison failed: {e}"}
        return {compare_table: views.compare_frame(rows), compare_message: " ".join(notes)}

    # --- handlers: schedule ----------------------------------------------------------------------
    @admin_only
    def save_schedule(_session, hours: float | None, minimum: float | None):
        try:
            schedule = admin.set_schedule(every_hours=hours, min_corrections=minimum)
        except StoreError as e:
            return {schedule_message: f"⚠️ {e}"}
        hours = schedule["retrain_every_hours"]
        return {schedule_message: "✅ Saved · 已保存: " + (
            f"retrain every {hours:g} h once {schedule['retrain_min_corrections']} new corrections are approved"
            if hours else "scheduled retrains are off · 定时重训已关闭")}

    # --- wiring -------------------------------------------------------------------------------------
    private = {"api_visibility": "private"}
    filters = [status_filter, channel_filter]
    everything = {seen, overview, name, author, description, corrections_table, selection, progress, loss_plot, report,
                  runs_table, retrain_button, cancel_button, dataset_button, adapters_table, version, every_hours,
                  min_corrections, schedule_message}
    gr.on([login_button.click, password_box.submit], login, password_box,
          {session, password_box, login_box, panel, poll_timer, login_message}, **private
          ).then(load_everything, [session, *filters], everything, **private)
    logout_button.click(logout, session, {session, login_box, panel, poll_timer, login_message}, **private)
    poll_timer.tick(poll, [session, seen], {session, login_box, panel, poll_timer, login_message, seen, overview, progress, loss_plot, report, runs_table, retrain_button,
                                            cancel_button, dataset_button, adapters_table, version},
                    show_progress="hidden", trigger_mode="always_last", **private)

    save_identity_button.click(save_identity, [session, name, author, description], {identity_message, overview}, **private)

    corrections_outputs = {corrections_table, selection, review_message, overview}
    gr.on([refresh_button.click, status_filter.change, channel_filter.change], list_corrections,
          [session, *filters, selection], corrections_outputs, **private)
    approve_button.click(approve, [session, selection, *filters], corrections_outputs, **private)
    reject_button.click(reject, [session, selection, *filters], corrections_outputs, **private)
    pending_button.click(back_to_pending, [session, selection, *filters], corrections_outputs, **private)
    corrections_table.select(pick_correction, session, {edit_id, edit_question, edit_answer}, **private)
    save_edit_button.click(save_edit, [session, edit_id, edit_question, edit_answer, *filters, selection],
                           corrections_outputs, **private)

    retrain_outputs = {retrain_message, progress, loss_plot, report, runs_table, retrain_button, cancel_button,
                       dataset_button}
    retrain_button.click(retrain, session, retrain_outputs, **private)
    cancel_button.click(cancel, session, retrain_outputs, **private)

    adapter_outputs = {adapter_message, adapters_table, version, overview}
    activate_button.click(activate, [session, version], adapter_outputs, **private)
    rollback_button.click(rollback, session, adapter_outputs, **private)

    compare_button.click(compare, [session, questions, compare_tokens], {compare_table, compare_message}, **private)
    save_schedule_button.click(save_schedule, [session, every_hours, min_corrections], schedule_message, **private)
