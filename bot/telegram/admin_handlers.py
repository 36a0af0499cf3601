"""Admin commands: review corrections, retrain and follow it, adapters, status; retrain announcements.

Only Telegram user ids in ``admin_ids`` may use them (empty: nobody); everyone else gets a refusal.
The actions are ``bot.admin.Admin``'s, the same as the web admin page and the CLI: ``/retrain`` only
queues a request (the job runner in ``selfcog serve`` trains) and then reads the run every couple
of seconds, editing one message with its progress until the result. A run is shown by formatting
bot.run_summary's RunSummary, as the web page and the CLI do. Refusals (UserError) are one line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.error import TelegramError
from telegram.ext import ContextTypes

from bot.errors import UserError
from bot.run_summary import RunSummary, duration, summarize
from bot.telegram.services import Services, services
from bot.telegram.text import edit, escape, send

log = logging.getLogger(__name__)

ADMIN_COMMANDS = [
    ("pending", "Corrections waiting for review"),
    ("retrain", "Retrain on the approved corrections"),
    ("cancel", "Cancel the queued or running retrain"),
    ("status", "Identity, live adapter, corrections, last retrain"),
    ("adapters", "Adapter versions and their scores"),
    ("activate", "Make a version live: /activate 3 (or base)"),
    ("rollback", "Go back to what was live before"),
]
REVIEW_PATTERN = r"^(approve|reject):(\d+)$"
PENDING_SHOWN = 10  # corrections listed by one /pending
ICONS = {"queued": "🔁", "running": "🔁", "promoted": "✅", "rejected": "❌", "cancelled": "⏹", "failed": "⚠️"}


def admin_only(handler):
    """Runs the handler for admins only; anyone else is told so."""

    @functools.wraps(handler)
    async def guarded(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        user = update.effective_user
        if services(context).is_admin(user.id if user else None):
            return await handler(update, context)
        if update.callback_query:
            await update.callback_query.answer("Only admins can do that.", show_alert=True)
        elif update.effective_message:
            command = (update.effective_message.text or "").split(maxsplit=1)[0].split("@")[0]
            await send(context.bot, update.effective_chat.id, f"Sorry, {escape(command)} is for admins only.",
                       reply_to=update.effective_message.message_id)

    return guarded


def review_keyboard(correction_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[InlineKeyboardButton("✅ Approve", callback_data=f"approve:{correction_id}"),
                                  InlineKeyboardButton("❌ Reject", callback_data=f"reject:{correction_id}")]])


# --- corrections -------------------------------------------------------------------------------------

@admin_only
async def pending(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Lists the corrections waiting for review, each with approve / reject buttons."""
    bot = services(context)
    chat_id = update.effective_chat.id
    rows = await bot.call(bot.admin.corrections, "pending")
    if not rows:
        await send(context.bot, chat_id, "No corrections are waiting for review.")
        return
    more = f"; the oldest {PENDING_SHOWN} below" if len(rows) > PENDING_SHOWN else ""
    await send(context.bot, chat_id, f"<b>{len(rows)}</b> correction{'s' * (len(rows) != 1)} waiting for review{more}.")
    for row in rows[:PENDING_SHOWN]:
        await send(context.bot, chat_id, correction_text(row), reply_markup=review_keyboard(row["id"]))


@admin_only
async def on_review(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """✅ / ❌ under a pending correction: approves or rejects it; the message then says who decided."""
    query = update.callback_query
    await query.answer()
    bot = services(context)
    status = "approved" if context.match.group(1) == "approve" else "rejected"
    correction_id = int(context.match.group(2))
    try:
        row = await bot.call(bot.admin.correction, correction_id)
        if row["status"] == "pending":
            await bot.call(bot.admin.review, [correction_id], status, reviewer=f"telegram:{query.from_user.id}")
            row = await bot.call(bot.admin.correction, correction_id)
    except UserError as e:  # gone, or not saved: the message says so
        await send(context.bot, query.message.chat_id, escape(e), reply_to=query.message.message_id)
        return
    await edit(context.bot, query.message.chat_id, query.message.message_id, correction_text(row))


def correction_text(row: dict) -> str:
    """A correction as an admin reviews it; once reviewed, who decided."""
    def clip(text: str | None, limit: int = 700) -> str:
        text = (text or "—").strip()
        return escape(text if len(text) <= limit else text[:limit] + "…")

    lines = [f"<b>Correction #{row['id']}</b> · {escape(row['channel'])}"
             + (f", from {escape(row['submitter'])}" if row.get("submitter") else ""),
             f"<b>Question:</b> {clip(row['question'])}"]
    if row.get("wrong_answer"):
        lines.append(f"<b>Bot said:</b> {clip(row['wrong_answer'])}")
    lines.append(f"<b>Should say:</b> {clip(row['corrected_answer'])}")
    if row["status"] != "pending":
        mark = "✅" if row["status"] == "approved" else "❌"
        lines.append(f"{mark} {row['status'].capitalize()} by {escape(row.get('reviewer') or 'someone')}")
    return "\n".join(lines)


# --- retraining --------------------------------------------------------------------------------------

@admin_only
async def retrain(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Asks for a retrain on the approved corrections, then follows it in one message to its result."""
    bot = services(context)
    chat_id, user = update.effective_chat.id, update.effective_user
    try:
        run = await bot.call(bot.admin.request_retrain, f"telegram:{user.id}", "telegram")
    except UserError as e:  # nothing approved yet, or one already running
        await send(context.bot, chat_id, f"Can't retrain now: {escape(e)}")
        return
    shown = run_text(summarize(run))  # when no job runner is alive, it says what to start
    message = await send(context.bot, chat_id, shown)
    bot.watched_runs.add(run["id"])
    bot.spawn(follow_run(context.bot, bot, chat_id, message.message_id, run["id"], shown=shown))


async def follow_run(tgbot, bot: Services, chat_id: int, message_id: int, run_id: int, *,
                     shown: str | None = None) -> None:
    """Edits the progress message every few seconds once the run starts, then shows its result."""
    try:
        while True:
            try:
                summary = await bot.call(bot.admin.run, run_id)
            except (UserError, sqlite3.Error) as e:  # the database busy for long: look again at the next tick
                log.warning("could not read retrain #%s: %s", run_id, e)
                await asyncio.sleep(bot.progress_every_s)
                continue
            text = run_text(summary)
            if summary.status != "queued" and text != shown:  # while queued, the first message says it all
                try:
                    await edit(tgbot, chat_id, message_id, text)
                except TelegramError as e:
                    log.warning("could not update retrain #%s's progress message: %s", run_id, e)
                    if summary.finished:  # the result must arrive: as a new message then
                        await send(tgbot, chat_id, text)
                shown = text
            if summary.finished:
                await bot.call(bot.admin.claim_announcement, run_id)  # this message was the announcement
                return
            await asyncio.sleep(bot.progress_every_s)
    finally:
        bot.watched_runs.discard(run_id)


@admin_only
async def cancel(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Cancels the queued or running retrain."""
    bot = services(context)
    try:
        run = await bot.call(bot.admin.cancel_retrain, by=f"telegram:{update.effective_user.id}")
    except UserError as e:
        await send(context.bot, update.effective_chat.id, f"Nothing to cancel: {escape(e)}")
        return
    done = "cancelled" if run["status"] == "cancelled" else "will stop at its next check"
    await send(context.bot, update.effective_chat.id, f"Retrain #{run['id']} {done}.")


def run_text(summary: RunSummary) -> str:
    """A retrain as one message: its outcome line, then the gate's reasons, scores and time once finished."""
    lines = [f"{ICONS.get(summary.status, '•')} {escape(summary.outcome_line)}"]
    if summary.finished:
        lines += [f"• {escape(reason)}" for reason in summary.reasons[1:]]  # the first is in the outcome line
        lines += metrics_lines(summary.metrics)
        if summary.seconds:
            lines.append(f"Took {duration(summary.seconds)}.")
    return "\n".join(lines)


def metrics_lines(metrics: dict) -> list[str]:
    """One line per evaluated weights: identity and general-answer retention."""
    lines = []
    for name, scores in metrics.items():
        if not isinstance(scores, dict):
            continue
        shown = [f"{key} {scores[value]:.2f}" for key, value in (("identity", "identity_mean"), ("retention", "retention"))
                 if isinstance(scores.get(value), (int, float))]
        if shown:
            lines.append(f"<b>{escape(name)}</b>: " + "; ".join(shown))
    return lines


async def announce_finished_runs(tgbot, bot: Services) -> None:
    """Forever: tells the admins how each finished retrain ended (a scheduled one, or one asked for elsewhere)."""
    while True:
        try:
            await announce_once(tgbot, bot)
        except Exception:  # keep announcing later; a locked database or a network blip must not end this
            log.exception("announcing finished retrains failed")
        await asyncio.sleep(bot.announce_every_s)


async def announce_once(tgbot, bot: Services) -> list[int]:
    """Announce each finished, unannounced run once (across every bot process); returns the run ids."""
    if not bot.admin_ids:
        return []
    announced = []
    for summary in await bot.call(bot.admin.unannounced_runs):
        if summary.id in bot.watched_runs:
            continue  # a /retrain message shows it here
        if not await bot.call(bot.admin.claim_announcement, summary.id):
            continue  # another process got there first
        text = run_text(summary)
        for admin_id in sorted(bot.admin_ids):
            try:
                await send(tgbot, admin_id, text)
            except TelegramError as e:  # the admin never opened a chat with the bot, or blocked it
                log.warning("could not tell admin %s about retrain #%s: %s", admin_id, summary.id, e)
        announced.append(summary.id)
    return announced


# --- adapters and status -----------------------------------------------------------------------------

@admin_only
async def adapters(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Lists the adapter versions, the live one marked, with their scores."""
    bot = services(context)
    rows = await bot.call(bot.admin.adapters)
    if not rows:
        await send(context.bot, update.effective_chat.id, "No adapters yet: the base model answers. /retrain makes one.")
        return
    lines = ["<b>Adapters</b> (● live)"]
    for row in rows[:20]:
        metrics = row.get("metrics") or {}
        scores = "; ".join(f"{key} {metrics[key]:.2f}" for key in ("identity_mean", "retention")
                           if isinstance(metrics.get(key), (int, float)))
        lines.append(f"{'●' if row['active'] else '○'} v{row['version']}"
                     + (f" — {escape(scores)}" if scores else "") + f" · {escape(row['created_at'][:16])}")
    lines.append("\n/activate N makes version N live; /rollback goes back.")
    await send(context.bot, update.effective_chat.id, "\n".join(lines))


@admin_only
async def activate(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/activate N (or base): makes that version live in every front end."""
    bot = services(context)
    chat_id = update.effective_chat.id
    arg = context.args[0].lower().lstrip("v") if context.args else ""
    if arg != "base" and not arg.isdigit():
        await send(context.bot, chat_id, "Which version? /activate 3, or /activate base for no adapter.")
        return
    version = None if arg == "base" else int(arg)
    try:
        await bot.call(bot.admin.activate, version, by=f"telegram:{update.effective_user.id}")
    except UserError as e:
        await send(context.bot, chat_id, f"Can't activate: {escape(e)}")
        return
    await send(context.bot, chat_id, f"{'The base model' if version is None else f'Adapter v{version}'} is now live.")


@admin_only
async def rollback(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Goes back to what was live before the last activation."""
    bot = services(context)
    try:
        row = await bot.call(bot.admin.rollback, by=f"telegram:{update.effective_user.id}")
    except UserError as e:
        await send(context.bot, update.effective_chat.id, f"Can't roll back: {escape(e)}")
        return
    live = f"adapter v{row['version']}" if row else "the base model"
    await send(context.bot, update.effective_chat.id, f"Rolled back: {live} is live now.")


@admin_only
async def status(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Identity, the live adapter, corrections waiting, and the current or last retrain."""
    bot = services(context)
    identity = await bot.call(bot.chat.status)
    overview = await bot.call(bot.admin.overview)
    live = f"adapter v{overview['adapter']}" if overview["adapter"] is not None else "the base model"
    lines = [f"<b>{escape(identity['name'])}</b> by {escape(identity['author'])}",
             f"Model {escape(identity['model'])}; live: {live}",
             f"Corrections: {overview['pending_corrections']} pending, {overview['approved_corrections']} approved"]
    if identity.get("adapter_error"):
        lines.append(f"⚠️ {escape(identity['adapter_error'])}")
    if overview["retrain"]:
        lines += ["", run_text(overview["retrain"])]
    await send(context.bot, update.effective_chat.id, "\n".join(lines))
