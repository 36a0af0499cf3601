"""The chat page: streamed answers, 👍/👎 on each answer, and "✏️ Correct this answer".

Components are declared in page order; the event wiring is together at the end. The conversation
lives in the store, through the chat service (the same one Telegram uses): the page keeps only ids
in its state (the conversation, and the stored message id of each message shown) and a random key
in the browser's localStorage that names this browser's conversation, so a reload shows it again.

Nothing typed is lost: when the chat service refuses a message or a correction (a UserError: empty,
too long, or "Couldn't save — try again" while the database stays locked), the text stays in its box
and one plain line says why.
"""

from __future__ import annotations

import re
import uuid

import gradio as gr

from bot.chat import ChatService
from bot.errors import UserError
from ui import views

STATUS_REFRESH_S = 3.0  # how soon a newly activated adapter shows in the status line
BROWSER_KEY = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, made by the server: anything else gets a new one
CORRECT = "✏️ Correct this answer · 纠正回答"  # a feedback option under each of the bot's answers (the ⚑ menu)

PLACEHOLDER = ("**Ask me anything.** If I get something about myself wrong, click 👎 under my answer and tell me "
               "the right one.\n\n**有问题尽管问。** 如果我对自己的介绍有误，请点击回答下方的 👎，告诉我正确的回答。")
HOW_TO_CORRECT = ("✏️ **Correct an answer · 纠正回答**: click 👎 (or ⚑ → *Correct this answer*) under the bot's "
                  "answer, write the right answer and submit. An admin reviews it before the bot learns it. · "
                  "点击回答下方的 👎，写下正确的回答并提交；管理员审核后机器人才会学习。")


NEW_CHAT = 0  # the conversation state after "New chat": no row yet, the next message starts one

def browser_key(key: str | None) -> str:
    """This browser's conversation key, or a new one when it has none (or sent something else)."""
    return key if isinstance(key, str) and BROWSER_KEY.fullmatch(key) else uuid.uuid4().hex


def chat_page(chat: ChatService, app: gr.Blocks) -> None:
    """Build the chat page inside the current gr.Blocks (app: that Blocks, for its load event)."""
    status = gr.Markdown(elem_id="chat-status")
    chatbot = gr.Chatbot(
        label="Chat · 聊天", height=480, sanitize_html=True, render_markdown=True, elem_id="chatbot",
        feedback_options=("Like", "Dislike", CORRECT), placeholder=PLACEHOLDER, buttons=["copy"])
    notice = gr.Markdown(elem_id="chat-notice")
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message, Enter to send · 输入消息，回车发送", show_label=False,
                             scale=8, autofocus=True, elem_id="chat-input", max_lines=8)
        send = gr.Button("Send · 发送", variant="primary", scale=1, elem_id="chat-send")
    with gr.Group(visible=False, elem_id="correction") as correction_box:
        correction_about = gr.Markdown(elem_id="correction-about")
        correction_text = gr.Textbox(label="The right answer · 正确的回答", lines=4, max_lines=16,
                                     placeholder="Write the answer I should have given · 写下我应该给出的回答",
                                     elem_id="correction-text")
        correction_notice = gr.Markdown(elem_id="correction-notice")
        with gr.Row():
            submit_correction = gr.Button("Submit correction · 提交纠正", variant="primary",
                                          elem_id="correction-submit")
            cancel_correction = gr.Button("Cancel · 取消", elem_id="correction-cancel")
    with gr.Row():
        new_chat = gr.Button("🆕 New chat · 新对话", size="sm", elem_id="chat-new", scale=0)
        gr.Markdown(HOW_TO_CORRECT, elem_id="chat-how-to-correct")

    key = gr.BrowserState("", storage_key="selfcog-chat-key")
    # None: this browser's latest conversation, started by its first message; NEW_CHAT: a new one, likewise
    conversation = gr.State(None)
    message_ids = gr.State([])  # the stored message id of each message shown, in order (None: not stored yet)
    correcting = gr.State(None)  # the stored id of the answer being corrected
    status_timer = gr.Timer(STATUS_REFRESH_S)

    def open_chat(saved_key: str):
        """On page load: this browser's conversation, read back from the store (nothing is written)."""
        saved_key = browser_key(saved_key)
        conversation_id = chat.conversation("web", chat_key=saved_key, create=False)
        history, ids = views.chat_messages(chat.history(conversation_id)) if conversation_id else ([], [])
        return {key: saved_key, conversation: conversation_id, chatbot: history, message_ids: ids,
                status: views.chat_status(chat.status())}

    def respond(text: str, saved_key: str, conversation_id: int | None):
        """Store the message, then stream the answer into the chat; a refusal keeps the text in the box."""
        saved_key = browser_key(saved_key)
        try:
            if conversation_id in (None, NEW_CHAT):  # nothing is written before the first message
                conversation_id = chat.conversation("web", chat_key=saved_key, user=saved_key,
                                                    new=conversation_id == NEW_CHAT)
            turn = chat.send(conversation_id, text)
        except UserError as e:
            yield {key: saved_key, conversation: conversation_id, notice: f"⚠️ {e}"}
            return
        history, ids = views.chat_messages(chat.history(conversation_id))
        history.append({"role": "assistant", "content": ""})
        yield {message: "", chatbot: history, message_ids: ids + [None], key: saved_key,
               conversation: conversation_id, notice: "", send: gr.Button(interactive=False)}
        problem = ""
        try:
            for partial in turn:
                history[-1]["content"] = partial
                yield {chatbot: history}
        except UserError as e:  # the model failed, or the answer could not be saved
            problem = f"⚠️ {e}"
        if not turn.text and not problem:
            problem = "⚠️ The model gave an empty answer; please try again or rephrase. · 模型没有给出回答，请重试。"
        history, ids = views.chat_messages(chat.history(conversation_id))  # what was stored, with its ids
        yield {chatbot: history, message_ids: ids, notice: problem, status: views.chat_status(chat.status())}

    def feedback(ids: list, saved_key: str, conversation_id: int | None, data: gr.LikeData):
        """👍/👎 on an answer is stored; 👎 and "Correct this answer" open the correction box for it."""
        index = data.index if isinstance(data.index, int) else data.index[0]
        if index >= len(ids) or ids[index] is None:
            return {notice: "⏳ That answer is still being written; wait until it is done. · 回答尚未完成。"}
        shown = {notice: ""}  # (a rating taken back: nothing to say)
        if data.liked in (True, False):
            try:
                chat.rate(ids[index], 1 if data.liked else -1, channel="web", user=browser_key(saved_key))
                shown[notice] = ("👍 Thanks for the feedback · 感谢反馈" if data.liked else
                                 "👎 Noted. What should I have said? Write it below. · 已记录。正确的回答是？请写在下方。")
            except UserError as e:
                shown[notice] = f"⚠️ {e}"
        if data.liked is False or data.liked == CORRECT:
            question = next((m["text"] for m in reversed(chat.history(conversation_id))
                             if m["role"] == "user" and m["id"] < ids[index]), "")
            shown.update({correction_box: gr.Group(visible=True), correcting: ids[index], correction_notice: "",
                          correction_about: f"✏️ The right answer to “{views.clip(question, 300)}” · 正确的回答"})
        return shown

    def save_correction(answer_id: int | None, text: str, saved_key: str):
        """Store the correction, pending review; on a refusal the text stays in the box with the reason."""
        if answer_id is None:
            return {correction_box: gr.Group(visible=False)}
        try:
            correction_id, created = chat.correct(answer_id, text, channel="web", submitter=browser_key(saved_key))
        except UserError as e:
            return {correction_notice: f"⚠️ {e}"}
        received = (f"✏️ Correction #{correction_id} received and **pending review**. Thank you! · "
                    f"纠正 #{correction_id} 已收到，**等待审核**。谢谢！" if created else
                    f"✏️ This correction was already received (#{correction_id}). · 已收到过此纠正。")
        return {notice: received, **close_correction()}

    def close_correction():
        return {correction_box: gr.Group(visible=False), correction_text: "", correction_notice: "", correcting: None}

    def start_new_chat(saved_key: str):
        """An empty chat; the conversation row is written with its first message."""
        return {key: browser_key(saved_key), conversation: NEW_CHAT, chatbot: [], message_ids: [], notice: "",
                **close_correction()}

    # --- wiring -------------------------------------------------------------------------------------
    private = {"api_visibility": "private"}
    correction_parts = {correction_box, correction_text, correction_notice, correcting}
    app.load(open_chat, key, {key, conversation, chatbot, message_ids, status}, show_progress="hidden")
    gr.on([message.submit, send.click], respond, [message, key, conversation],
          {message, chatbot, message_ids, key, conversation, notice, status, send}, concurrency_id="chat", **private
          ).then(lambda: gr.Button(interactive=True), None, send, show_progress="hidden", **private)  # answered
    chatbot.like(feedback, [message_ids, key, conversation],
                 {notice, correction_box, correction_about, correction_notice, correcting}, **private)
    submit_correction.click(save_correction, [correcting, correction_text, key], {notice, *correction_parts},
                            **private)
    cancel_correction.click(close_correction, None, correction_parts, **private)
    gr.on([new_chat.click, chatbot.clear], start_new_chat, key,
          {key, conversation, chatbot, message_ids, notice, *correction_parts}, **private)
    status_timer.tick(lambda: views.chat_status(chat.status()), None, status, show_progress="hidden", **private)
