"""The admin page: identity, the corrections queue, retraining, adapters, before/after, schedule.

Nothing here shows or changes anything until the browser has logged in. The password goes to
/admin/login (ui/app.py), which answers with an HttpOnly session cookie; every handler below takes
the request and goes through ``Context.admin_only``, which checks that cookie against the server's
sessions (ui/sessions.py). A request made without the page, or with another browser's session_hash,
carries no session and is refused with one log line.

Retraining never runs here. The page asks for it through ``Admin.request_retrain`` (the same call
Telegram's /retrain makes); the job runner in ``selfcog serve`` claims it and writes progress to the
run's row, which a ``gr.Timer`` polls every couple of seconds, so the page never waits on training.

Each tab is built by its own function (identity_tab … schedule_tab) that declares its components in
page order, then its handlers, then its wiring, and returns what it shows when the panel opens (a
TabView). Tabs read only through ``Admin`` (and the chat service's profile).
Handlers return ``{component: value}`` dicts, so each updates only what it changed.
"""

from __future__ import annotations

import functools
import html
import logging
from dataclasses import dataclass
from typing import Callable

import gradio as gr

from bot.admin import Admin
from bot.chat import ChatService
from bot.engines import AdapterRef
from bot.errors import UserError
from ui import views
from ui.sessions import COOKIE, AdminSessions, client_host

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often the page looks at the retrain's row
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
EXPIRED = "Your admin session ended: please log in again. · 登录已过期，请重新登录。"

# The password goes from the browser to /admin/login, never through Gradio's queue; the cookie the
# answer sets comes with every later event. Returns the refusal ("" when logged in) to login_done.
LOG_IN_JS = """async (password) => {
  try {
    const answer = await fetch("admin/login", {method: "POST", headers: {"Content-Type": "application/json"},
                                               body: JSON.stringify({password: password || ""})});
    return [(await answer.json()).message];
  } catch (e) { return ["The server did not answer; try again."]; }
}"""
LOG_OUT_JS = """async () => { try { await fetch("admin/logout", {method: "POST"}); } catch (e) {} return []; }"""


@dataclass
class TabView:
    """What a tab shows when the panel opens (login, or a reload with a live session): the
    components it fills and a function that reads their values."""
    outputs: set
    read: Callable[[], dict]


@dataclass
class Context:
    """What every tab builder gets: the services, the login check, and the page's shared events."""
    chat: ChatService
    admin: Admin
    sessions: AdminSessions
    tick: gr.Timer  # every POLL_S while the panel is open
    overview: gr.Markdown  # the line above the tabs; handlers that change its facts refresh it

    def logged_in(self, request: gr.Request, *, touch: bool = True) -> bool:
        return self.sessions.active(request.cookies.get(COOKIE), touch=touch)

    def admin_only(self, fn: Callable | None = None, *, refused: Callable[[], dict] | None = None,
                   touch: bool = True):
        """Run the handler (its first parameter: request: gr.Request) only for a logged-in session.

        A refused call is logged in one line and raises gr.Error(NOT_LOGGED_IN), or, for the page's own
        calls (loads, timer ticks), returns what refused() says to show instead. touch=False: the call
        does not count as activity (a timer must not keep an unattended page logged in)."""
        if fn is None:
            return functools.partial(self.admin_only, refused=refused, touch=touch)

        @functools.wraps(fn)
        def checked(request: gr.Request, *args):
            if not self.logged_in(request, touch=touch):
                log.warning("refused admin call %s from %s: not logged in", fn.__name__, client_host(request))
                if refused is not None:
                    return refused()
                raise gr.Error(NOT_LOGGED_IN, title="Not logged in · 未登录", print_exception=False)
            return fn(request, *args)

        checked.admin_only = True
        return checked

    def overview_view(self) -> dict:
        return {self.overview: views.overview(self.admin.overview())}


def admin_page(chat: ChatService, admin: Admin, sessions: AdminSessions, app: gr.Blocks) -> None:
    """Build the admin page inside the current gr.Blocks (app: that Blocks, for its load event)."""
    with gr.Row(equal_height=True) as login_box:
        password_box = gr.Textbox(label="Admin password · 管理员密码", type="password", scale=4,
                                  elem_id="admin-password", placeholder="SELFCOG_ADMIN_PASSWORD")
        login_button = gr.Button("🔐 Log in · 登录", variant="primary", scale=1, elem_id="admin-login")
    login_message = gr.Markdown(elem_id="admin-login-message")
    poll_timer = gr.Timer(POLL_S, active=False)

    with gr.Column(visible=False, elem_id="admin-panel") as panel:
        with gr.Row(equal_height=True):
            overview = gr.Markdown(elem_id="admin-overview")
            logout_button = gr.Button("Log out · 退出", size="sm", scale=0, elem_id="admin-logout")
        ctx = Context(chat, admin, sessions, poll_timer, overview)
        with gr.Tabs():
            with gr.Tab("Identity · 身份", id="identity"):
                identity = identity_tab(ctx)
            with gr.Tab("Corrections · 纠正", id="corrections"):
                corrections = corrections_tab(ctx)
            with gr.Tab("Retrain · 重训", id="retrain"):
                retrain = retrain_tab(ctx)
            with gr.Tab("Adapters · 适配器", id="adapters"):
                adapters = adapters_tab(ctx)
            with gr.Tab("Before / after · 对比", id="compare"):
                compare_tab(ctx)
            with gr.Tab("Schedule · 计划", id="schedule"):
                schedule = schedule_tab(ctx)
    tabs = [identity, corrections, retrain, adapters, schedule]

    def logged_in_view(message: str = "") -> dict:
        shown = {login_box: gr.Row(visible=False), panel: gr.Column(visible=True), poll_timer: gr.Timer(active=True),
                 login_message: message, **ctx.overview_view()}
        for tab in tabs:
            shown.update(tab.read())
        return shown

    def logged_out_view(message: str = "") -> dict:
        return {login_box: gr.Row(visible=True), panel: gr.Column(visible=False), poll_timer: gr.Timer(active=False),
                login_message: message}

    def opened(request: gr.Request) -> bool:
        """Whether this page has a live admin session; if so, its events are for that session only."""
        if not ctx.logged_in(request):
            return False
        sessions.bind(request.session_hash, request.cookies.get(COOKIE))
        return True

    def login_done(refusal: str, request: gr.Request):
        """After /admin/login answered: open the panel if the session cookie is good, else say why not."""
        if opened(request):
            return {password_box: "", **logged_in_view("✅ Logged in · 已登录")}
        return {password_box: "", **logged_out_view(f"❌ {html.escape(refusal or NOT_LOGGED_IN)}")}

    def page_load(request: gr.Request):
        """A reload keeps a live session open (the cookie comes with it); otherwise the login shows."""
        return logged_in_view() if opened(request) else {login_box: gr.skip()}

    def logout_done(request: gr.Request):
        sessions.end(request.cookies.get(COOKIE))  # already ended by /admin/logout, unless that failed
        return logged_out_view("Logged out · 已退出")

    @ctx.admin_only(refused=lambda: logged_out_view(EXPIRED), touch=False)
    def poll_overview(request: gr.Request, shown: str | None):
        now = views.overview(admin.overview())
        return {overview: now} if now != shown else {overview: gr.skip()}

    private = {"api_visibility": "private"}
    page_parts = {login_box, panel, poll_timer, login_message, overview}
    opening = {*page_parts, *(part for tab in tabs for part in tab.outputs)}
    gr.on([login_button.click, password_box.submit], login_done, password_box, {password_box, *opening},
          js=LOG_IN_JS, **private)
    app.load(page_load, None, opening, show_progress="hidden", **private)
    logout_button.click(logout_done, None, page_parts, js=LOG_OUT_JS, **private)
    poll_timer.tick(poll_overview, overview, page_parts, show_progress="hidden", trigger_mode="always_last",
                    **private)


def identity_tab(ctx: Context) -> TabView:
    with gr.Row():
        name = gr.Textbox(label="Name · 名字", max_length=64, elem_id="identity-name")
        author = gr.Textbox(label="Developer · 开发者", max_length=128, elem_id="identity-author")
    description = gr.Textbox(label="Description (optional) · 描述（可选）", lines=2, max_length=1000,
                             elem_id="identity-description")
    save_button = gr.Button("Save identity · 保存身份", variant="primary", elem_id="identity-save")
    message = gr.Markdown(elem_id="identity-message")

    def read() -> dict:
        profile = ctx.chat.profile()
        return {name: profile.name, author: profile.author, description: profile.description}

    @ctx.admin_only
    def save(request: gr.Request, new_name: str, new_author: str, new_description: str):
        try:
            profile = ctx.admin.set_identity(name=new_name, author=new_author, description=new_description,
                                             by=REVIEWER)
        except UserError as e:
            return {message: f"⚠️ {e}"}
        return {message: f"✅ Saved · 已保存. The bot now serves under: *{ctx.chat.system_prompt()}* "
                         f"Retrain so {profile.name} also answers as itself without it. · 重训后身份才会写入模型。",
                **ctx.overview_view()}

    save_button.click(save, [name, author, description], {message, ctx.overview}, api_visibility="private")
    return TabView({name, author, description}, read)


def corrections_tab(ctx: Context) -> TabView:
    with gr.Row(equal_height=True):
        status_filter = gr.Dropdown(STATUS_FILTERS, value="pending", label="Status · 状态", elem_id="corrections-status")
        channel_filter = gr.Dropdown(CHANNEL_FILTERS, value="all", label="Channel · 渠道",
                                     elem_id="corrections-channel")
        refresh_button = gr.Button("🔄 Refresh · 刷新", size="sm", scale=0)
    table = gr.Dataframe(interactive=False, wrap=True, max_height=360, elem_id="corrections-table",
                         column_widths=["5%", "25%", "32%", "18%", "7%", "7%", "6%"],
                         label="Corrections (click a row to edit it) · 纠正列表（点击一行可编辑）")
    selection = gr.CheckboxGroup(label="Select for a bulk action · 选择以批量操作", choices=[], show_select_all=True,
                                 elem_id="corrections-selection")
    with gr.Row():
        approve_button = gr.Button("✅ Approve · 批准", variant="primary", elem_id="corrections-approve")
        reject_button = gr.Button("🚫 Reject · 拒绝", variant="stop", elem_id="corrections-reject")
        pending_button = gr.Button("↩️ Back to pending · 退回待审")
    message = gr.Markdown(elem_id="corrections-message")
    with gr.Accordion("Edit a correction · 编辑纠正", open=False, elem_id="correction-edit") as editor:
        edit_id = gr.Number(label="Correction # · 编号", precision=0, elem_id="edit-id")
        edit_question = gr.Textbox(label="Question · 问题", lines=2, elem_id="edit-question")
        edit_answer = gr.Textbox(label="Correct answer · 正确回答", lines=3, elem_id="edit-answer")
        save_edit_button = gr.Button("Save edit · 保存修改", elem_id="edit-save")

    def listed(status: str, channel: str, selected: list[int] | None = None) -> dict:
        rows = ctx.admin.corrections(status=None if status == "all" else status,
                                     channel=None if channel == "all" else channel, limit=500)
        shown = {r["id"] for r in rows}
        return {table: views.corrections_frame(rows),
                selection: gr.CheckboxGroup(choices=views.correction_choices(rows),
                                            value=[i for i in selected or [] if i in shown])}

    def read() -> dict:
        return {status_filter: "pending", channel_filter: "all", **listed("pending", "all")}

    @ctx.admin_only
    def refresh(request: gr.Request, status: str, channel: str, selected: list[int]):
        return listed(status, channel, selected)

    def review(new_status: str):
        @ctx.admin_only
        def review(request: gr.Request, selected: list[int], status: str, channel: str):
            if not selected:
                return {message: "⚠️ Select one or more corrections first. · 请先选择纠正。"}
            try:
                ids = ctx.admin.review(list(selected), new_status, reviewer=REVIEWER)
            except UserError as e:
                return {message: f"⚠️ {e}"}
            done = {"approved": "✅ Approved · 已批准", "rejected": "🚫 Rejected · 已拒绝",
                    "pending": "↩️ Back to pending · 已退回"}[new_status]
            return {message: f"{done}: " + ", ".join(f"#{i}" for i in ids), **listed(status, channel),
                    **ctx.overview_view()}

        return review

    @ctx.admin_only
    def pick(request: gr.Request, data: gr.SelectData):
        """A click on a row of the table opens that correction in the editor."""
        try:
            row = ctx.admin.correction(int(data.row_value[0]))
        except (UserError, TypeError, ValueError, IndexError):
            return {edit_id: gr.skip()}
        return {edit_id: row["id"], edit_question: row["question"], edit_answer: row["corrected_answer"],
                editor: gr.Accordion(open=True)}

    @ctx.admin_only
    def save_edit(request: gr.Request, correction_id: float | None, question: str, answer: str, status: str,
                  channel: str, selected: list[int]):
        if not correction_id:
            return {message: "⚠️ Click a correction in the table first. · 请先在表格中点击一条纠正。"}
        try:
            row = ctx.admin.edit_correction(int(correction_id), question=question, answer=answer, by=REVIEWER)
        except UserError as e:
            return {message: f"⚠️ {e}"}
        return {message: f"✏️ Correction #{row['id']} saved · 已保存", **listed(status, channel, selected)}

    private = {"api_visibility": "private"}
    filters = [status_filter, channel_filter]
    outputs = {table, selection, message, ctx.overview}
    gr.on([refresh_button.click, status_filter.input, channel_filter.input], refresh, [*filters, selection],
          {table, selection}, **private)
    approve_button.click(review("approved"), [selection, *filters], outputs, **private)
    reject_button.click(review("rejected"), [selection, *filters], outputs, **private)
    pending_button.click(review("pending"), [selection, *filters], outputs, **private)
    table.select(pick, None, {edit_id, edit_question, edit_answer, editor}, **private)
    save_edit_button.click(save_edit, [edit_id, edit_question, edit_answer, *filters, selection], outputs, **private)
    return TabView({status_filter, channel_filter, table, selection}, read)


def retrain_tab(ctx: Context) -> TabView:
    with gr.Row():
        retrain_button = gr.Button("🚀 Retrain now · 立即重训", variant="primary", elem_id="retrain-start")
        cancel_button = gr.Button("⏹️ Cancel · 取消", variant="stop", elem_id="retrain-cancel")
    message = gr.Markdown(elem_id="retrain-message")
    progress = gr.HTML(views.progress_html(None), elem_id="retrain-progress")
    loss_plot = gr.LinePlot(views.losses_frame([]), x="step", y="loss", title="Training loss · 训练损失", height=260,
                            elem_id="loss-plot")
    report = gr.Markdown(elem_id="run-report")
    download = gr.HTML(elem_id="dataset-download-box")  # a link to /admin/download/dataset (ui/app.py)
    runs_table = gr.Dataframe(interactive=False, wrap=True, label="Runs · 历史", max_height=300, elem_id="runs-table",
                              column_widths=["5%", "9%", "8%", "10%", "7%", "8%", "10%", "43%"])
    seen = gr.State(None)  # the run facts shown now; a poll that finds them unchanged sends nothing

    def facts(run) -> tuple | None:
        return None if run is None else (run.id, run.status, run.stage, run.step, run.loss, run.cancel_requested)

    def shown() -> dict:
        run = ctx.admin.current_run()
        found = ctx.admin.recent_run_file("dataset")
        link = "" if found is None else (
            f'<a id="dataset-download" href="admin/download/dataset" download>⬇️ Training set of retrain '
            f'#{found[0]["id"]} (ms-swift JSONL) · 下载训练集</a>')
        return {seen: facts(run), progress: views.progress_html(run), report: views.run_report(run),
                loss_plot: views.losses_frame(ctx.admin.losses(run.id) if run else []), download: link,
                runs_table: views.runs_frame(ctx.admin.runs(20)),
                retrain_button: gr.Button(interactive=run is None or run.finished),
                cancel_button: gr.Button(interactive=run is not None and not run.finished)}

    @ctx.admin_only(refused=lambda: {seen: gr.skip()}, touch=False)
    def poll(request: gr.Request, facts_shown: tuple | None):
        """Every POLL_S: progress, loss curve, report and runs, when the run changed."""
        if facts(ctx.admin.current_run()) == facts_shown:
            return {seen: gr.skip()}  # (an empty dict would not mean "no change" to Gradio)
        return shown()

    @ctx.admin_only
    def retrain(request: gr.Request):
        try:
            run = ctx.admin.request_retrain(REVIEWER, "web")
        except UserError as e:  # none approved yet, or one already queued/running
            return {message: f"⚠️ {e}"}
        waiting = (" No job runner is running: start `selfcog serve` to train it. · 没有任务进程在运行。"
                   if run.get("waiting_for_runner") else " Progress shows below. · 进度见下方。")
        return {message: f"🚀 Retrain #{run['id']} queued.{waiting}", **shown(), **ctx.overview_view()}

    @ctx.admin_only
    def cancel(request: gr.Request):
        try:
            run = ctx.admin.cancel_retrain(by=REVIEWER)
        except UserError as e:
            return {message: f"⚠️ {e}"}
        outcome = "cancelled · 已取消" if run["status"] == "cancelled" else "cancel requested · 正在取消"
        return {message: f"⏹️ Retrain #{run['id']}: {outcome}", **shown()}

    private = {"api_visibility": "private"}
    parts = {seen, progress, report, loss_plot, download, runs_table, retrain_button, cancel_button}
    ctx.tick.tick(poll, seen, parts, show_progress="hidden", trigger_mode="always_last", **private)
    retrain_button.click(retrain, None, {message, ctx.overview, *parts}, **private)
    cancel_button.click(cancel, None, {message, *parts}, **private)
    return TabView(parts, shown)


def adapters_tab(ctx: Context) -> TabView:
    table = gr.Dataframe(interactive=False, label="Adapter versions · 适配器版本", elem_id="adapters-table")
    with gr.Row(equal_height=True):
        version = gr.Dropdown(label="Version · 版本", choices=[], elem_id="adapter-version")
        activate_button = gr.Button("Activate · 启用", variant="primary", elem_id="adapter-activate")
        rollback_button = gr.Button("↩️ Roll back · 回滚", elem_id="adapter-rollback")
    message = gr.Markdown(elem_id="adapter-message")
    seen = gr.State(None)  # the versions and the live one, as shown

    def listed(pick_live: bool = True) -> dict:
        """The table and the picker; pick_live=False leaves the admin's pick alone (timer refreshes)."""
        rows = ctx.admin.adapters()
        live = next((r["version"] for r in rows if r["active"]), None)
        choices = [("base model · 基础模型", "base")] + [(f"v{r['version']}", str(r["version"])) for r in rows]
        picker = gr.Dropdown(choices=choices, value=str(live or "base")) if pick_live else gr.Dropdown(choices=choices)
        return {table: views.adapters_frame(rows), version: picker, seen: (len(rows), live)}

    @ctx.admin_only(refused=lambda: {seen: gr.skip()}, touch=False)
    def poll(request: gr.Request, shown: tuple | None):
        now = listed(pick_live=False)
        return now if now[seen] != shown else {seen: gr.skip()}

    @ctx.admin_only
    def activate(request: gr.Request, chosen: str | None):
        if not chosen:
            return {message: "⚠️ Pick a version first. · 请先选择版本。"}
        try:
            row = ctx.admin.activate(None if chosen == "base" else int(chosen), by=REVIEWER)
        except UserError as e:  # unknown version, or a folder that is not a LoRA for this model
            return {message: f"⚠️ {e}"}
        return {message: f"✅ {views.adapter_name(row['version'] if row else None)} is now live. · 已启用。",
                **listed(), **ctx.overview_view()}

    @ctx.admin_only
    def rollback(request: gr.Request):
        try:
            row = ctx.admin.rollback(by=REVIEWER)
        except UserError as e:
            return {message: f"⚠️ {e}"}
        return {message: f"↩️ Rolled back: {views.adapter_name(row['version'] if row else None)} is live again. "
                         "· 已回滚。", **listed(), **ctx.overview_view()}

    private = {"api_visibility": "private"}
    outputs = {message, table, version, seen, ctx.overview}
    ctx.tick.tick(poll, seen, {table, version, seen}, show_progress="hidden", trigger_mode="always_last", **private)
    activate_button.click(activate, version, outputs, **private)
    rollback_button.click(rollback, None, outputs, **private)
    return TabView({table, version, seen}, listed)


def compare_tab(ctx: Context) -> None:
    questions = gr.Textbox("\n".join(DEFAULT_QUESTIONS), lines=7, label="Questions, one a line · 问题（每行一个）",
                           elem_id="compare-questions")
    with gr.Row(equal_height=True):
        tokens = gr.Slider(8, 256, value=COMPARE_MAX_NEW_TOKENS, step=8, elem_id="compare-tokens",
                           label="Answer length, tokens (longer is slower) · 回答长度（越长越慢）")
        compare_button = gr.Button("Compare base / active / candidate · 对比", variant="primary",
                                   elem_id="compare-run")
    message = gr.Markdown(elem_id="compare-message")
    table = gr.Dataframe(interactive=False, wrap=True, elem_id="compare-table")

    @ctx.admin_only
    def compare(request: gr.Request, text: str, max_new_tokens: float):
        """Answer the questions with the base model, the live adapter and the last run's candidate."""
        asked = [q.strip() for q in (text or "").splitlines() if q.strip()]
        weights = {"base": AdapterRef.BASE}
        live = ctx.chat.status()["adapter_version"]
        if live:
            weights[f"active v{live}"] = AdapterRef.ACTIVE
        found = ctx.admin.recent_run_file("candidate")
        if found:
            weights[f"candidate (retrain #{found[0]['id']})"] = str(found[1])
        notes = [] if live else ["No adapter is live, so base is also what serves. · 当前无适配器。"]
        if not found:
            notes.append("No retrain has left a candidate yet. · 暂无候选适配器。")
        if len(asked) > MAX_COMPARE_QUESTIONS:
            notes.append(f"Only the first {MAX_COMPARE_QUESTIONS} questions were asked. · "
                         f"只比较前 {MAX_COMPARE_QUESTIONS} 个问题。")
        try:
            rows = ctx.chat.compare(asked[:MAX_COMPARE_QUESTIONS], weights,
                                    max_new_tokens=int(max_new_tokens or COMPARE_MAX_NEW_TOKENS))
        except UserError as e:  # no questions, or a candidate folder deleted or broken meanwhile
            return {message: f"⚠️ {e}"}
        return {table: views.compare_frame(rows), message: " ".join(notes)}

    compare_button.click(compare, [questions, tokens], {table, message}, api_visibility="private")


def schedule_tab(ctx: Context) -> TabView:
    with gr.Row():
        every_hours = gr.Number(label="Retrain every N hours (0 = off) · 每 N 小时重训（0 = 关闭）", minimum=0,
                                elem_id="schedule-hours")
        min_corrections = gr.Number(label="…when at least N new approved corrections · 至少 N 条新批准的纠正",
                                    precision=0, minimum=1, elem_id="schedule-min")
    save_button = gr.Button("Save schedule · 保存计划", elem_id="schedule-save")
    message = gr.Markdown(elem_id="schedule-message")

    def read() -> dict:
        schedule = ctx.admin.schedule()
        return {every_hours: schedule["retrain_every_hours"], min_corrections: schedule["retrain_min_corrections"],
                message: "" if None not in schedule.values() else
                "Blank fields: the server's setting (SELFCOG_RETRAIN_EVERY_HOURS / _MIN_CORRECTIONS) applies. · "
                "空白：使用服务器的设置。"}

    @ctx.admin_only
    def save(request: gr.Request, hours: float | None, minimum: float | None):
        try:
            schedule = ctx.admin.set_schedule(every_hours=hours, min_corrections=minimum)
        except UserError as e:
            return {message: f"⚠️ {e}"}
        hours = schedule["retrain_every_hours"]
        return {message: "✅ Saved · 已保存: " + (
            f"retrain every {hours:g} h once {schedule['retrain_min_corrections']} new corrections are approved"
            if hours else "scheduled retrains are off · 定时重训已关闭")}

    save_button.click(save, [every_hours, min_corrections], message, api_visibility="private")
    return TabView({every_hours, min_corrections, message}, read)
