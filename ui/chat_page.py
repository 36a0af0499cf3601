"""The chat page: streamed answers, 👍/👎 on each answer, and ✏️ "edit an answer" to correct it.

Components are declared in page order; the event wiring is together at the end. The conversation
lives in the store, through the chat service (the same one Telegram uses): the page keeps only ids
in its state (the conversation, and the stored message id of each message shown) and a random key
in the browser's localStorage that names this browser's conversation, so a reload shows it again.
"""

from __future__ import annotations

import re
import uuid

import gradio as gr

from bot.chat import ChatInputError, ChatService
from ui import views

STATUS_REFRESH_S = 3.0  # how soon a newly activated adapter shows in the status line
BROWSER_KEY = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, made by the server: anything else gets a new one

PLACEHOLDER = ("**Ask me anything.** If I get something about myself wrong, hover my answer and click ✏️ to correct "
               "it.\n\n**有问题尽管问。** 如果我对自己的介绍有误，请将鼠标移到回答上，点击 ✏️ 纠正。")
HOW_TO_CORRECT = ("✏️ **Correct an answer · 纠正回答**: hover over the bot's answer, click the pencil, type the right "
                  "answer and save. An admin reviews it before the bot learns it. · 将鼠标移到回答上，点击铅笔图标，"
                  "输入正确的回答并保存；管理员审核后机器人才会学习。")


def browser_key(key: str | None) -> str:
    """This browser's conversation key, or a new one when it has none (or sent something else)."""
    return key if isinstance(key, str) and BROWSER_KEY.fullmatch(key) else uuid.uuid4().hex


def chat_page(chat: ChatService, app: gr.Blocks) -> None:
    """Build the chat page inside the current gr.Blocks (app: that Blocks, for its load event)."""
    status = gr.Markdown(elem_id="chat-status")
    chatbot = gr.Chatbot(
        label="Chat · 聊天", height=480, editable="all", sanitize_html=True, render_markdown=True,
        feedback_options=("Like", "Dislike"), elem_id="chatbot", placeholder=PLACEHOLDER, buttons=["copy"])
    notice = gr.Markdown(elem_id="chat-notice")
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message, Enter to send · 输入消息，回车发送", show_label=False,
                             scale=8, autofocus=True, elem_id="chat-input", max_lines=8)
        send = gr.Button("Send · 发送", variant="primary", scale=1, elem_id="chat-send")
    with gr.Row():
        new_chat = gr.Button("🆕 New chat · 新对话", size="sm", elem_id="chat-new", scale=0)
        gr.Markdown(HOW_TO_CORRECT, elem_id="chat-how-to-correct")

    key = gr.BrowserState("", storage_key="selfcog-chat-key")
    conversation = gr.State(None)
    message_ids = gr.State([])  # the stored message id of each message shown, in order (None: not stored yet)
    status_timer = gr.Timer(STATUS_REFRESH_S)

    def open_chat(saved_key: str):
        """On page load: this browser's conversation, read back from the store."""
        if saved_key != browser_key(saved_key):
            return browser_key(None), None, [], [], views.chat_status(chat.status())
        conversation_id = chat.conversation("web", chat_key=saved_key, user=saved_key)
        history, ids = views.chat_messages(chat.history(conversation_id))
        return saved_key, conversation_id, history, ids, views.chat_status(chat.status())

    def respond(text: str, saved_key: str, conversation_id: int | None):
        """Store the message, then stream the answer into the chat; bad input is refused with the reason."""
        saved_key = browser_key(saved_key)
        if conversation_id is None:
            conversation_id = chat.conversation("web", chat_key=saved_key, user=saved_key)
        try:
            turn = chat.send(conversation_id, text)
        except ChatInputError as e:  # the text stays in the box, to be fixed
            gr.Warning(str(e), title="Message not sent · 未发送")
            yield gr.skip(), gr.skip(), gr.skip(), saved_key, conversation_id, f"⚠️ {e}", gr.skip()
            return
        history, ids = views.chat_messages(chat.history(conversation_id))
        history.append({"role": "assistant", "content": ""})
        yield "", history, ids + [None], saved_key, conversation_id, "", gr.skip()
        problem = ""
        try:
            for partial in turn:
                history[-1]["content"] = partial
                yield gr.skip(), history, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        except ChatInputError as e:
            problem = f"⚠️ {e}"
        if not turn.text and not problem:
            problem = "⚠️ The model gave an empty answer; please try again or rephrase. · 模型没有给出回答，请重试。"
        history, ids = views.chat_messages(chat.history(conversation_id))  # what was stored, with its ids
        yield gr.skip(), history, ids, gr.skip(), gr.skip(), problem, views.chat_status(chat.status())

    def rate(ids: list, saved_key: str, data: gr.LikeData):
        """👍/👎 on an answer."""
        index = data.index if isinstance(data.index, int) else data.index[0]
        if index >= len(ids) or ids[index] is None:
            return "⏳ That answer is still being written; rate it once it is done. · 回答尚未完成。"
        if data.liked not in (True, False):  # a rating taken back
            return ""
        try:
            chat.rate(ids[index], 1 if data.liked else -1, channel="web", user=browser_key(saved_key))
        except ChatInputError as e:
            return f"⚠️ {e}"
        return "👍 Thanks for the feedback · 感谢反馈" if data.liked else "👎 Thanks, noted · 已记录，感谢反馈"

    def correct(ids: list, saved_key: str, conversation_id: int | None, data: gr.EditData):
        """An edited answer is a correction: stored pending review; the chat keeps showing what the bot said."""
        index = data.index if isinstance(data.index, int) else data.index[0]
        value = data.value if isinstance(data.value, str) else " ".join(
            part.get("text", "") for part in data.value if isinstance(part, dict))
        history = views.chat_messages(chat.history(conversation_id))[0] if conversation_id else gr.skip()
        if index >= len(ids) or ids[index] is None:
            return history, "⚠️ Only the bot's finished answers can be corrected. · 只能纠正机器人已完成的回答。"
        try:
            correction_id, created = chat.correct(ids[index], value, channel="web", submitter=browser_key(saved_key))
        except ChatInputError as e:
            return history, f"⚠️ {e} · 未能提交纠正。"
        if not created:
            return history, f"✏️ This correction was already received (#{correction_id}). · 已收到过此纠正。"
        return history, (f"✏️ Correction #{correction_id} received and **pending review**. Thank you! · "
                         f"纠正 #{correction_id} 已收到，**等待审核**。谢谢！")

    def start_new_chat(saved_key: str):
        saved_key = browser_key(saved_key)
        conversation_id = chat.conversation("web", chat_key=saved_key, user=saved_key, new=True)
        return saved_key, conversation_id, [], [], ""

    # --- wiring -------------------------------------------------------------------------------------
    app.load(open_chat, key, [key, conversation, chatbot, message_ids, status], show_progress="hidden")
    gr.on([message.submit, send.click], respond, [message, key, conversation],
          [message, chatbot, message_ids, key, conversation, notice, status], concurrency_id="chat",
          api_visibility="private")
    chatbot.like(rate, [message_ids, key], notice, api_visibility="private")
    chatbot.edit(correct, [message_ids, key, conversation], [chatbot, notice], api_visibility="private")
    gr.on([new_chat.click, chatbot.clear], start_new_chat, key, [key, conversation, chatbot, message_ids, notice],
          api_visibility="private")
    status_timer.tick(lambda: views.chat_status(chat.status()), None, status, show_progress="hidden",
                      api_visibility="private")
