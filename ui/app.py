"""The web app: chat page for everyone, admin page behind a password.

    >>> demo = build_app(chat, admin, admin_password="s3cret")
    >>> launch(demo, "127.0.0.1", 7860)

Built by a function so tests can serve it in-process; only `selfcog serve` / `selfcog web` launch it.
Without SELFCOG_ADMIN_PASSWORD the admin page is never open: build_app makes a one-time token and
prints it, like Jupyter does.
"""

from __future__ import annotations

import secrets

import gradio as gr

from bot.admin import Admin
from bot.chat import ChatService
from ui.admin_page import admin_page
from ui.chat_page import chat_page

# Chat requests queue in the engine, which batches them, so Gradio must not serialize them first
# (its default of one event at a time per handler made one user's answer wait for another's).
CHAT_CONCURRENCY = 16

CSS = """
#chat-status, #admin-overview { font-size: 0.95em; }
#retrain-state progress { height: 14px; margin-top: 6px; }
"""


def one_time_token() -> str:
    """An admin password for this run only, printed where whoever started the server sees it."""
    token = secrets.token_urlsafe(12)
    print(f"SELFCOG_ADMIN_PASSWORD is not set: the admin page password for this run is {token}", flush=True)
    return token


def build_app(chat: ChatService, admin: Admin, *, admin_password: str | None = None) -> gr.Blocks:
    password = admin_password or one_time_token()
    with gr.Blocks(title=f"{chat.profile().name} · selfcog") as demo:
        with gr.Tabs():
            with gr.Tab("💬 Chat · 聊天", id="chat", elem_id="tab-chat"):
                chat_page(chat, demo)
            with gr.Tab("🔐 Admin · 管理", id="admin", elem_id="tab-admin"):
                admin_page(chat, admin, password=password)
    return demo


def launch(demo: gr.Blocks, host: str, port: int, **kwargs):
    demo.queue(default_concurrency_limit=CHAT_CONCURRENCY)
    return demo.launch(server_name=host, server_port=port, show_error=True, css=CSS, **kwargs)
