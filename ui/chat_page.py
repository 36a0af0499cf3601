"""The chat page: streamed answers, 👍/👎 on each answer, and "edit an answer" to correct it.

Components are declared in page order; the event wiring is together at the end. The page keeps
only ids in its state (the conversation and, per shown message, the stored message id); the text
itself lives in the store through the chat service, the same one Telegram uses.
"""

from __future__ import annotations

import gradio as gr

from bot.chat import ChatInputError, ChatService

TITLE = "💬 Chat · 聊天"


def status_line(chat: ChatService) -> str:
    status = chat.status()
    adapter = f"adapter v{status['adapter_version']}" if status["adapter_version"] else "base model (no adapter)"
    return f"**{status['name']}** · {status['model']} · {adapter}"


def chat_page(chat: ChatService) -> None:
    """Build the chat page inside the current gr.Blocks."""
    status = gr.Markdown(status_line(chat), elem_id="chat-status")
    chatbot = gr.Chatbot(
        label="Chat · 聊天", height=520, editable="all", sanitize_html=True, render_markdown=True,
        feedback_options=("Like", "Dislike"), elem_id="chatbot",
        placeholder="Ask me anything. If I get something about myself wrong, edit my answer (✏️) to correct me.\n\n"
                    "有问题尽管问。如果我对自己的介绍有误，请点 ✏️ 编辑我的回答来纠正我。")
    notice = gr.Markdown("", elem_id="chat-notice")
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message · 输入消息", show_label=False, scale=8, autofocus=True,
                             elem_id="chat-input", max_lines=8)
        send = gr.Button("Send · 发送", variant="primary", scale=1, elem_id="chat-send")
    new_chat = gr.Button("New chat · 新对话", size="sm", elem_id="chat-new")

    conversation = gr.State(None)
    message_ids = gr.State([])  # stored message id for each message shown, in order

    def respond(text, history, ids, conversation_id, request: gr.Request):
        if conversation_id is None:
            conversation_id = chat.conversation("web", chat_key=request.session_hash, user=request.session_hash, new=True)
        try:
            turn = chat.send(conversation_id, text)
        except ChatInputError as e:
            raise gr.Error(str(e), title="Message not sent · 未发送")  # the text stays in the box
        history = history + [{"role": "user", "content": text.strip()}, {"role": "assistant", "content": ""}]
        ids = ids + [turn.user_message_id, None]
        for partial in turn:
            history[-1]["content"] = partial
            yield "", history, ids, conversation_id, gr.update()
        ids[-1] = turn.message_id
        yield "", history, ids, conversation_id, status_line(chat)

    def rate(ids, data: gr.LikeData, request: gr.Request):
        message_id = ids[data.index] if isinstance(data.index, int) and data.index < len(ids) else None
        if message_id is None:
            return "The answer is still being written; rate it once it is done."
        try:
            chat.rate(message_id, 1 if data.liked else -1, channel="web", user=request.session_hash)
        except ChatInputError as e:
            return f"⚠️ {e}"
        return "Thanks for the feedback · 感谢反馈"

    def correct(history, ids, data: gr.EditData, request: gr.Request):
        index = data.index if isinstance(data.index, int) else data.index[0]
        restored = [dict(m) for m in history]
        restored[index]["content"] = data.previous_value  # the shown answer stays what the bot said
        if history[index]["role"] != "assistant" or index >= len(ids) or ids[index] is None:
            return restored, "⚠️ Only the bot's finished answers can be corrected · 只能纠正机器人已完成的回答"
        try:
            correction_id, created = chat.correct(ids[index], data.value, channel="web", submitter=request.session_hash)
        except ChatInputError as e:
            return restored, f"⚠️ {e}"
        if not created:
            return restored, f"✏️ This correction was already received (#{correction_id}) · 已收到过此纠正"
        return restored, (f"✏️ Correction #{correction_id} received, pending review. Thank you! · "
                          f"纠正 #{correction_id} 已收到，等待审核。谢谢！")

    def start_new_chat(request: gr.Request):
        conversation_id = chat.conversation("web", chat_key=request.session_hash, user=request.session_hash, new=True)
        return [], [], conversation_id, "", status_line(chat)

    outputs = [message, chatbot, message_ids, conversation, status]
    message.submit(respond, [message, chatbot, message_ids, conversation], outputs, concurrency_id="chat")
    send.click(respond, [message, chatbot, message_ids, conversation], outputs, concurrency_id="chat")
    chatbot.like(rate, [message_ids], notice)
    chatbot.edit(correct, [chatbot, message_ids], [chatbot, notice])
    new_chat.click(start_new_chat, None, [chatbot, message_ids, conversation, notice, status])
