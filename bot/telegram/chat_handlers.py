"""What everyone can do: chat, rate and correct answers, and the commands around that.

In private chats every text is a question. In groups the bot answers only when it is @mentioned or
a message of its own is replied to. Under each finished answer: 👍 / 👎 / ✏️ Correct, whose
callback data carry the stored answer's id and the asker's Telegram id; ✏️ asks for the right answer
with ForceReply, and the reply to that prompt becomes a pending correction (question, wrong answer,
fix) for an admin to review.
"""

from __future__ import annotations

import logging
import math
import re

from telegram import ForceReply, InlineKeyboardButton, InlineKeyboardMarkup, Message, MessageEntity, Update
from telegram.constants import ChatType
from telegram.error import BadRequest, TelegramError
from telegram.ext import ContextTypes

from bot.errors import UserError
from bot.telegram.admin_handlers import ADMIN_COMMANDS
from bot.telegram.services import CHANNEL, Services, services
from bot.telegram.streaming import stream_turn
from bot.telegram.text import clip, escape, is_not_modified, send

log = logging.getLogger(__name__)

PUBLIC_COMMANDS = [
    ("start", "Say hello"),
    ("help", "What I can do"),
    ("reset", "Start a new conversation"),
    ("whoami", "Who I am and which version answers"),
    ("correct", "Correct my last answer: /correct the right answer"),
]
RATE_PATTERN = r"^(up|down):(\d+):(\d+)$"  # rating:answer id:asker id
FIX_PATTERN = r"^fix:(\d+):(\d+)$"  # answer id:asker id
PROMPT = re.compile(r"^✏️.*\(correcting answer #(\d+)\)", re.DOTALL)
TEXT_ONLY = "I can only read text for now. Please type your question."
RESTARTING = "Sorry, I was restarting and didn't get to your message. Please send it again."
NOT_FOUND = "I can't find that answer any more. Ask me again to rate or correct it."


def answer_keyboard(message_id: int, asker_id: int, rated: int = 0) -> InlineKeyboardMarkup:
    """👍 / 👎 / ✏️ under an answer; ``rated`` ticks the rating already given."""
    def button(label: str, what: str, tick: bool = False) -> InlineKeyboardButton:
        return InlineKeyboardButton(label + (" ✓" if tick else ""), callback_data=f"{what}:{message_id}:{asker_id}")

    return InlineKeyboardMarkup([[button("👍", "up", rated > 0), button("👎", "down", rated < 0),
                                  button("✏️ Correct", "fix")]])


# --- commands --------------------------------------------------------------------------------------

async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Greets, says who the bot is and how to correct it."""
    bot = services(context)
    status = await bot.call(bot.chat.status)
    await send(context.bot, update.effective_chat.id,
               f"Hi! I'm <b>{escape(status['name'])}</b>, made by {escape(status['author'])}. Ask me anything.\n\n"
               "Under each answer: 👍 / 👎 to rate it, ✏️ to tell me what I should have said. /help lists the commands.")


async def help_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Lists the commands; admins also see theirs."""
    bot = services(context)
    lines = [f"/{name} — {escape(what)}" for name, what in PUBLIC_COMMANDS]
    if bot.is_admin(update.effective_user.id):
        lines += ["", "<b>Admin</b>"] + [f"/{name} — {escape(what)}" for name, what in ADMIN_COMMANDS]
    group_note = "\n\nIn groups, @mention me or reply to one of my messages."
    await send(context.bot, update.effective_chat.id, "\n".join(lines) + group_note)


async def reset(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Starts a new conversation in this chat: earlier messages are no longer context."""
    bot = services(context)
    user, chat = update.effective_user, update.effective_chat
    await bot.call(bot.chat.conversation, CHANNEL, chat_key=str(chat.id), user=user.id,
                   display_name=user.full_name, new=True)
    await send(context.bot, chat.id, "Started a new conversation: I've forgotten what we said before.")


async def whoami(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Says who the bot is and which weights answer (the adapter version)."""
    bot = services(context)
    status = await bot.call(bot.chat.status)
    version = status["adapter_version"]
    weights = f"adapter v{version}" if version is not None else "the base model (no adapter yet)"
    text = (f"I'm <b>{escape(status['name'])}</b>, made by {escape(status['author'])}.\n"
            f"Model: {escape(status['model'])}, answering with {weights}.")
    if status.get("adapter_error"):
        text += f"\n⚠️ The newest adapter could not be loaded: {escape(status['adapter_error'])}"
    await send(context.bot, update.effective_chat.id, text)


async def correct(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/correct <right answer>: corrects the answer replied to, else my last answer to you here."""
    bot = services(context)
    message, user = update.effective_message, update.effective_user
    answer_id, problem = await answer_to_correct(context, bot, message, user)
    if problem:
        await send(context.bot, message.chat_id, problem, reply_to=message.message_id)
        return
    parts = (message.text or "").split(maxsplit=1)
    if len(parts) < 2:
        await ask_for_correction(context, bot, message.chat_id, user, answer_id, reply_to=message.message_id)
        return
    await save_correction(update, context, answer_id, parts[1])


async def answer_to_correct(context, bot: Services, message: Message, user) -> tuple[int | None, str | None]:
    """Which answer /correct means, or why there is none: the answer the command replies to, else the
    sender's last answer here. In groups only the member who asked may correct an answer."""
    replied = message.reply_to_message
    if replied is not None and replies_to_bot(message, context.bot.id):
        buttons = answer_buttons(replied)
        if buttons is not None:
            answer_id, asker = buttons
            if asker != user.id:
                return None, "Only the person who asked can correct that answer. Ask me yourself, then correct mine."
            return answer_id, None
    if is_group(message):
        answer_id = bot.last_answers.get((message.chat_id, user.id))
        if answer_id is None:
            return None, "Reply /correct to the answer of mine to you that you want to correct."
        return answer_id, None
    conversation = await bot.call(bot.chat.conversation, CHANNEL, chat_key=str(message.chat_id), user=user.id,
                                  display_name=user.full_name)
    last = await bot.call(bot.chat.last_answer, conversation)
    if last is None:
        return None, "There's no answer of mine in this chat to correct yet."
    return last["id"], None


async def unknown_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A command the bot doesn't have (in groups: only when addressed to this bot)."""
    message = update.effective_message
    command = message.text.split(maxsplit=1)[0]
    if is_group(message) and f"@{context.bot.username}".lower() not in command.lower():
        return  # meant for another bot in the group
    await send(context.bot, message.chat_id, f"Sorry, I don't know {escape(clip(command.split('@')[0], 40))}. "
                                             "/help lists what I can do.", reply_to=message.message_id)


# --- messages --------------------------------------------------------------------------------------

async def admit(bot: Services, update: object) -> bool:
    """The door to a chat's queue: a question over its sender's limit is refused here, before it
    waits for its turn; the first refusal in a while says how long to wait."""
    message = update.message if isinstance(update, Update) else None
    if message is None or message.from_user is None:
        return True
    try:
        tgbot = message.get_bot()
        if not is_question(message, tgbot):
            return True
        refused = bot.messages.take(message.from_user.id)
        if refused is None:
            return True
        if refused.warn:
            await send(tgbot, message.chat_id, slow_down(refused.wait_s), reply_to=message.message_id)
    except TelegramError as e:
        log.warning("could not ask user %s to slow down: %s", message.from_user.id, e)
    except Exception:  # a bug here must not lose the message: let it in, the handlers report errors
        log.exception("checking update %s at the door failed", update.update_id)
        return True
    return False


async def turned_away(update: object) -> None:
    """A message still waiting for its turn when the bot stops: ask for it again."""
    message = update.message if isinstance(update, Update) else None
    if message is None:
        return
    try:
        await send(message.get_bot(), message.chat_id, RESTARTING, reply_to=message.message_id)
    except TelegramError as e:
        log.warning("could not tell chat %s its message went unanswered: %s", message.chat_id, e)


def slow_down(wait_s: float) -> str:
    return f"You're writing faster than I can answer. Please wait {max(1, math.ceil(wait_s))} s, then try again."


async def on_text(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A text: the answer to a ✏️ prompt becomes a correction; a question addressed to the bot is answered."""
    message = update.effective_message
    answer_id = prompted_answer(message, context.bot.id)
    if answer_id is not None:
        await on_correction_reply(update, context, answer_id)
        return
    text = addressed_text(message, context.bot)
    if text is None:
        return  # group chatter not meant for the bot
    await answer(update, context, services(context), text)


async def on_media(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Stickers, photos, voice notes and other non-text messages: a polite note that only text is read."""
    message = update.effective_message
    if is_group(message) and not replies_to_bot(message, context.bot.id):
        return
    note = f"Nice sticker {message.sticker.emoji or ''}! " + TEXT_ONLY if message.sticker else TEXT_ONLY
    await send(context.bot, message.chat_id, escape(note), reply_to=message.message_id)


async def answer(update: Update, context: ContextTypes.DEFAULT_TYPE, bot: Services, text: str) -> None:
    """Answers a question, streaming the reply (ChatOrderedUpdates keeps one chat's answers in order)."""
    message, user, chat = update.effective_message, update.effective_user, update.effective_chat
    group = is_group(message)
    conversation = await bot.call(bot.chat.conversation, CHANNEL, chat_key=str(chat.id), user=user.id,
                                  display_name=user.full_name)
    turn = await bot.call(bot.chat.send, conversation, text)
    await stream_turn(context.bot, chat.id, turn, pool=bot.generation, reply_to=message.message_id if group else None,
                      every_s=bot.group_edit_every_s if group else bot.edit_every_s,
                      keyboard=lambda turn: answer_keyboard(turn.message_id, user.id),
                      cut_short=bot.cut_short, patience_s=bot.final_edit_patience_s)
    if group and turn.message_id:
        bot.last_answers[(chat.id, user.id)] = turn.message_id  # what a later /correct of theirs means


# --- buttons under answers and the correction that follows ✏️ ----------------------------------------

async def on_rate(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """👍 / 👎 under an answer: stores the rating and ticks it on the keyboard."""
    query = update.callback_query
    bot = services(context)
    rating = 1 if context.match.group(1) == "up" else -1
    answer_id, asker = int(context.match.group(2)), int(context.match.group(3))
    problem = button_problem(query, asker)
    if problem is None and already_rated(query):
        problem = f"You already rated this answer {'👍' if rating > 0 else '👎'}."
    if problem is None and (refused := bot.corrections.take(query.from_user.id)):
        problem = slow_down(refused.wait_s)
    await query.answer(problem)
    if problem or not await answer_here(context, bot, query, answer_id):
        return
    await bot.call(bot.chat.rate, answer_id, rating, channel=CHANNEL, user=query.from_user.id)
    try:
        await query.edit_message_reply_markup(answer_keyboard(answer_id, asker, rated=rating))
    except BadRequest as e:  # a double press: the first one ticked it already
        if not is_not_modified(e):
            raise


async def on_fix(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """✏️ under an answer: asks whoever asked for the right answer."""
    query = update.callback_query
    bot = services(context)
    answer_id, asker = int(context.match.group(1)), int(context.match.group(2))
    problem = button_problem(query, asker)
    await query.answer(problem or "Reply with the right answer.")
    if problem or not await answer_here(context, bot, query, answer_id):
        return
    await ask_for_correction(context, bot, query.message.chat_id, query.from_user, answer_id,
                             reply_to=query.message.message_id)


async def stale_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A button whose data this version of the bot does not know (an old message)."""
    await update.callback_query.answer("This button no longer works. Ask me again to get fresh ones.")


def button_problem(query, asker: int) -> str | None:
    """Why a press on an answer's button can't be acted on (too old, someone else's), or None."""
    if not isinstance(query.message, Message):
        return "That message is too old for its buttons to work."
    if query.from_user.id != asker:
        return "These buttons are for the person who asked. Ask me yourself to rate or correct my answer."
    return None


async def answer_here(context, bot: Services, query, answer_id: int) -> bool:
    """The answer a button names is stored, from this chat; if not, says so in the chat."""
    try:
        await bot.call(bot.chat.answer_in, answer_id, channel=CHANNEL, chat_key=str(query.message.chat_id))
    except UserError:
        await send(context.bot, query.message.chat_id, NOT_FOUND, reply_to=query.message.message_id)
        return False
    return True


def already_rated(query) -> bool:
    """The pressed rating button is already ticked (the keyboard shows the rating given)."""
    keyboard = query.message.reply_markup.inline_keyboard if query.message.reply_markup else ()
    pressed = [b for row in keyboard for b in row if b.callback_data == query.data]
    return bool(pressed) and pressed[0].text.endswith("✓")


def answer_buttons(message: Message) -> tuple[int, int] | None:
    """(answer id, asker id) from the ✏️ button under one of the bot's answers, or None."""
    keyboard = message.reply_markup.inline_keyboard if message.reply_markup else ()
    for button in (b for row in keyboard for b in row):
        found = re.match(FIX_PATTERN, str(button.callback_data or ""))
        if found:
            return int(found.group(1)), int(found.group(2))
    return None


async def ask_for_correction(context: ContextTypes.DEFAULT_TYPE, bot: Services, chat_id: int, user,
                             answer_id: int, *, reply_to: int) -> None:
    """Sends the ✏️ prompt the user replies to with the right answer (ForceReply opens the reply box)."""
    who = f"{user.mention_html()}, w" if chat_id != user.id else "W"
    prompt = await send(context.bot, chat_id,
                        f"✏️ {who}hat should I have said? Reply to this message with the right answer. "
                        f"(correcting answer #{answer_id})", reply_to=reply_to,
                        reply_markup=ForceReply(selective=True, input_field_placeholder="The right answer…"))
    bot.prompts[(chat_id, prompt.message_id)] = user.id


async def on_correction_reply(update: Update, context: ContextTypes.DEFAULT_TYPE, answer_id: int) -> None:
    """The reply to a ✏️ prompt: stored as a pending correction, if it comes from whoever pressed ✏️."""
    bot = services(context)
    message = update.effective_message
    asked = bot.prompts.get((message.chat_id, message.reply_to_message.message_id))
    if asked is not None and asked != update.effective_user.id:
        await send(context.bot, message.chat_id, "That question was for someone else. Press ✏️ under an answer "
                                                 "to correct it yourself.", reply_to=message.message_id)
        return
    if await save_correction(update, context, answer_id, message.text):
        bot.prompts.pop((message.chat_id, message.reply_to_message.message_id), None)


async def save_correction(update: Update, context: ContextTypes.DEFAULT_TYPE, answer_id: int, text: str) -> bool:
    """Stores a correction of one answer (pending review) and confirms it; False if it was refused."""
    bot = services(context)
    message, user = update.effective_message, update.effective_user
    refused = bot.corrections.take(user.id)
    if refused:
        if refused.warn:
            await send(context.bot, message.chat_id, slow_down(refused.wait_s), reply_to=message.message_id)
        return False
    try:
        await bot.call(bot.chat.answer_in, answer_id, channel=CHANNEL, chat_key=str(message.chat_id))
        correction_id, created = await bot.call(bot.chat.correct, answer_id, text, channel=CHANNEL,
                                                submitter=str(user.id))
    except UserError as e:  # empty, too long, not this chat's, or not saved (SaveFailed: send it again)
        await send(context.bot, message.chat_id, escape(e), reply_to=message.message_id)
        return False
    note = (f"✅ Thanks! I saved your correction (#{correction_id}). An admin reviews it before I learn from it."
            if created else f"I already have that correction (#{correction_id}). Thanks!")
    await send(context.bot, message.chat_id, note, reply_to=message.message_id)
    return True


# --- who a message is for ----------------------------------------------------------------------------

def is_group(message: Message) -> bool:
    return message.chat.type in (ChatType.GROUP, ChatType.SUPERGROUP)


def replies_to_bot(message: Message, bot_id: int) -> bool:
    target = message.reply_to_message
    return bool(target and target.from_user and target.from_user.id == bot_id)


def prompted_answer(message: Message, bot_id: int) -> int | None:
    """The answer id when this message replies to one of the bot's ✏️ prompts, else None."""
    if not replies_to_bot(message, bot_id):
        return None
    found = PROMPT.match(message.reply_to_message.text or "")
    return int(found.group(1)) if found else None


def is_question(message: Message, bot) -> bool:
    """A text the model will answer: not a command, not a correction, addressed to the bot."""
    command = any(e.type == MessageEntity.BOT_COMMAND and e.offset == 0 for e in message.entities)
    return (bool(message.text) and not command and prompted_answer(message, bot.id) is None
            and addressed_text(message, bot) is not None)


def addressed_text(message: Message, bot) -> str | None:
    """The question for the bot: any text in private chats; in groups only a mention or a reply to the bot."""
    text = message.text or ""
    if not is_group(message):
        return text
    mention = re.compile(rf"@{re.escape(bot.username)}\b", re.IGNORECASE)
    mentioned = any(entity.user and entity.user.id == bot.id for entity in message.entities) or mention.search(text)
    if not (mentioned or replies_to_bot(message, bot.id)):
        return None
    return mention.sub("", text).strip()
