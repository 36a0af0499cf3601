"""The web app: chat page for everyone, admin page behind a password.

    >>> demo = build_app(chat, admin, admin_password="s3cret")
    >>> launch(demo, "127.0.0.1", 7860)

Built by a function so tests can serve it in-process; only `selfcog serve` / `selfcog web` launch it.
"""

from __future__ import annotations

import gradio as gr

from bot.admin import Admin
from bot.chat import ChatService
from ui.chat_page import chat_page

# Chat requests queue in the engine, which batches them, so Gradio must not serialize them first
# (its default of one event at a time per handler made one user's answer wait for another's).
CHAT_CONCURRENCY = 16


def build_app(chat: ChatService, admin: Admin, *, admin_password: str | None = None) -> gr.Blocks:
    with gr.Blocks(title=f"{chat.profile().name} · selfcog") as demo:
        with gr.Tab("Chat · 聊天", id="chat"):
            chat_page(chat)
    return demo


def launch(demo: gr.Blocks, host: str, port: int, **kwargs):
    demo.queue(default_concurrency_limit=CHAT_CONCURRENCY)
    return demo.launch(server_name=host, server_port=port, show_error=True, **kwargs)
