"""What everyone can do: chat, rate and correct answers, and the commands around that.

In private chats every text is a question. In groups the bot answers only when it is @mentioned or
a message of its own is replied to. Under each finished answer: 👍 / 👎 / ✏️ Correct, whose
callback data carry the stored answer's id and the asker's Telegram id; ✏️ asks for the right answer
with ForceReply, and the reply to that prompt becomes a pending correction (question, wrong answer,
fix) for an admin to review.
"""

from __future__ import annotations

import logging
import re

from telegram import ForceReply, InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.constants import ChatType
from telegram.error import BadRequest
from telegram.ext import ContextTypes

from bot.chat import ChatInputError
from bot.telegram.admin_handlers import ADMIN_COMMANDS
from bot.telegram.services import CHANNEL, Services, services
from bot.telegram.streaming import stream_turn
from bot.telegram.text import escape, is_not_modified, send

log = logging.getLogger(__name__)

PUBLIC_COMMANDS = [
    ("start", "Say hello"),
    ("help", "What I can do"),
    ("reset", "Start a new conversation"),
    ("whoami", "Who I am and which version answers"),
    ("correct", "Correct my last answer: /correct the right answer"),
]
RATE_PATTERN = r"^(up|down|fix):(\d+):(\d+)$"  # what:answer id:asker id
PROMPT = re.compile(r"^✏️.*\(correcting answer #(\d+)\)", re.DOTALL)
SLOW_DOWN = "You're writing faster than I can answer. Please wait a little, then try again."
TEXT_ONLY = "I can only read text for now. Please type your question."


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
    """/correct <right answer>: corrects my last answer in this chat; without text, asks for it."""
    bot = services(context)
    message, user, chat = update.effective_message, update.effective_user, update.effective_chat
    conversation = await bot.call(bot.chat.conversation, CHANNEL, chat_key=str(chat.id), user=user.id,
                                  display_name=user.full_name)
    last = await bot.call(bot.chat.last_answer, conversation)
    if last is None:
        await send(context.bot, chat.id, "There's no answer of mine in this chat to correct yet.")
        return
    parts = (message.text or "").split(maxsplit=1)
    if len(parts) < 2:
        await ask_for_correction(context, bot, chat.id, user, last["id"], reply_to=message.message_id)
        return
    await save_correction(update, context, last["id"], parts[1])


async def unknown_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A command the bot doesn't have (in groups: only when addressed to this bot)."""
    message = update.effective_message
    command = message.text.split(maxsplit=1)[0]
    if is_group(message) and f"@{context.bot.username}".lower() not in command.lower():
        return  # meant for another bot in the group
    await send(context.bot, message.chat_id, f"Sorry, I don't know {escape(command.split('@')[0])}. "
                                             "/help lists what I can do.", reply_to=message.message_id)


# --- messages --------------------------------------------------------------------------------------

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
    bot = services(context)
    verdict = await bot.messages.allow(update.effective_user.id)
    if verdict != "ok":
        if verdict == "warn":
            await send(context.bot, message.chat_id, SLOW_DOWN, reply_to=message.message_id)
        return
    await answer(update, context, bot, text)


async def on_media(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Stickers, photos, voice notes and other non-text messages: a polite note that only text is read."""
    message = update.effective_message
    if is_group(message) and not replies_to_bot(message, context.bot.id):
        return
    note = f"Nice sticker {message.sticker.emoji or ''}! " + TEXT_ONLY if message.sticker else TEXT_ONLY
    await send(context.bot, message.chat_id, escape(note), reply_to=message.message_id)


async def answer(update: Update, context: ContextTypes.DEFAULT_TYPE, bot: Services, text: str) -> None:
    """Answer a question, streaming the reply; answers in one chat come one after another."""
    message, user, chat = update.effective_message, update.effective_user, update.effective_chat
    reply_to = message.message_id if is_group(message) else None
    async with bot.chat_lock(chat.id):
        try:
            conversation = await bot.call(bot.chat.conversation, CHANNEL, chat_key=str(chat.id), user=user.id,
                                          display_name=user.full_name)
            turn = await bot.call(bot.chat.send, conversation, text)
            await stream_turn(context.bot, chat.id, turn, pool=bot.generation, reply_to=reply_to,
                              every_s=bot.group_edit_every_s if is_group(message) else bot.edit_every_s,
                              keyboard=lambda turn: answer_keyboard(turn.message_id, user.id))
        except ChatInputError as e:  # empty, too long, binary, or the model failed: the message says what to do
            await send(context.bot, chat.id, escape(e), reply_to=message.message_id)


# --- buttons under answers and the correction that follows ✏️ ----------------------------------------

async def on_answer_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """👍 / 👎 / ✏️ under an answer: rates it, or asks for the right answer."""
    query = update.callback_query
    bot = services(context)
    what, message_id, asker = context.match.group(1), int(context.match.group(2)), int(context.match.group(3))
    problem = await button_problem(query, bot, message_id, asker)
    if problem:
        await query.answer(problem)
        return
    if what == "fix":
        await query.answer("Reply with the right answer.")
        await ask_for_correction(context, bot, query.message.chat_id, query.from_user, message_id,
                                 reply_to=query.message.message_id)
        return
    rating = 1 if what == "up" else -1
    if already_rated(query):
        await query.answer(f"You already rated this answer {'👍' if rating > 0 else '👎'}.")
        return
    if await bot.corrections.allow(query.from_user.id) != "ok":
        await query.answer(SLOW_DOWN)
        return
    await bot.call(bot.chat.rate, message_id, rating, channel=CHANNEL, user=query.from_user.id)
    await query.answer("Thanks for the feedback!")
    try:
        await query.edit_message_reply_markup(answer_keyboard(message_id, asker, rated=rating))
    except BadRequest as e:  # a double press: the first one ticked it already
        if not is_not_modified(e):
            raise


async def stale_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A button whose data this version of the bot does not know (an old message)."""
    await update.callback_query.answer("This button no longer works. Ask me again to get fresh ones.")


async def button_problem(query, bot: Services, message_id: int, asker: int) -> str | None:
    """Why a press on an answer's button can't be acted on (too old, someone else's, unknown), or None."""
    if not isinstance(query.message, Message):
        return "That message is too old for its buttons to work."
    if query.from_user.id != asker:
        return "These buttons are for the person who asked. Ask me yourself to rate or correct my answer."
    try:
        await bot.call(bot.chat.answer_in, message_id, channel=CHANNEL, chat_key=str(query.message.chat_id))
    except ChatInputError:
        return "I can't find that answer any more. Ask me again to rate or correct it."
    return None


def already_rated(query) -> bool:
    """The pressed rating button is already ticked (the keyboard shows the rating given)."""
    keyboard = query.message.reply_markup.inline_keyboard if query.message.reply_markup else ()
    pressed = [b for row in keyboard for b in row if b.callback_data == query.data]
    return bool(pressed) and pressed[0].text.endswith("✓")


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
    verdict = await bot.corrections.allow(user.id)
    if verdict != "ok":
        if verdict == "warn":
            await send(context.bot, message.chat_id, SLOW_DOWN, reply_to=message.message_id)
        return False
    try:
        await bot.call(bot.chat.answer_in, answer_id, channel=CHANNEL, chat_key=str(message.chat_id))
        correction_id, created = await bot.call(bot.chat.correct, answer_id, text, channel=CHANNEL,
                                                submitter=str(user.id))
    except ChatInputError as e:
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
