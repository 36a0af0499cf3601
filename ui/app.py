"""The web app: chat page for everyone, admin page behind a password.

    >>> app = build_app(chat, admin, admin_password="s3cret")
    >>> launch(app, "127.0.0.1", 7860)

Built by a function so tests can serve it in-process; only `selfcog serve` / `selfcog web` launch it.
Without SELFCOG_ADMIN_PASSWORD the admin page is never open: build_app makes a one-time token and
prints it, like Jupyter does.

The Gradio page is mounted on a small FastAPI app that owns what Gradio's events cannot do: set and
clear the admin's session cookie (/admin/login, /admin/logout; see ui/sessions.py) and send the
training set to a logged-in admin straight from the run's folder (/admin/download/dataset), so it
is never copied into a cache that anyone could fetch.
"""

from __future__ import annotations

import logging
import secrets

import fastapi
import gradio as gr
import uvicorn
from fastapi.responses import FileResponse, JSONResponse
from gradio.http_server import Server
from gradio.routes import App as GradioApp
from pydantic import BaseModel
from starlette.routing import Mount

from bot.admin import Admin
from bot.chat import ChatService
from ui.admin_page import admin_page
from ui.chat_page import chat_page
from ui.sessions import COOKIE, IDLE_S, AdminSessions, LoginRefused, client_host

log = logging.getLogger(__name__)

STOP_GRACE_S = 10

CSS = """
#chat-status, #admin-overview { font-size: 0.95em; }
#retrain-state progress, #retrain-state .run-bar { width: 100%; height: 14px; margin-top: 6px; }
#retrain-state .run-bar { background: #2e7d32; border-radius: 7px; }
#retrain-state[data-ok="false"] .run-bar { background: #c62828; }
#retrain-state[data-ok="neutral"] .run-bar { background: #9e9e9e; }
"""


class Login(BaseModel):
    password: str = ""


def one_time_token() -> str:
    """An admin password for this run only, printed where whoever started the server sees it."""
    token = secrets.token_urlsafe(12)
    print(f"SELFCOG_ADMIN_PASSWORD is not set: the admin page password for this run is {token}", flush=True)
    return token


def build_app(chat: ChatService, admin: Admin, *, admin_password: str | None = None, admin_idle_s: float = IDLE_S,
              sessions: AdminSessions | None = None) -> fastapi.FastAPI:
    """The whole web app. admin_idle_s: an admin session ends after this long without an admin action;
    sessions: the admin sessions and login throttle (tests pass their own). The chat's sampling
    settings travel in the ChatService."""
    sessions = sessions or AdminSessions(admin_password or one_time_token(), idle_s=admin_idle_s)
    with gr.Blocks(title=f"{chat.profile().name} · selfcog") as demo:
        with gr.Tabs():
            with gr.Tab("💬 Chat · 聊天", id="chat", elem_id="tab-chat"):
                chat_page(chat, demo)
            with gr.Tab("🔐 Admin · 管理", id="admin", elem_id="tab-admin"):
                admin_page(chat, admin, sessions, demo)
    # The engine decodes `capacity` replies at once: Gradio must let that many chats answer together rather
    # than queue them behind one another, beside the page timers and admin events (its own total is 40).
    demo.max_threads = max(40, chat.engine.capacity + 16)
    demo.queue(default_concurrency_limit=chat.engine.capacity)

    app = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.blocks = demo  # for tests that call the page's handlers directly

    @app.middleware("http")
    async def admin_events_only_to_their_admin(request: fastapi.Request, call_next):
        """An admin page's event stream is read with its session_hash, a value in the URL: refuse it to
        any request without that admin's cookie, so the hash alone shows nothing of the admin's page."""
        if request.url.path.endswith("/queue/data") and not sessions.may_read(
                request.query_params.get("session_hash"), request.cookies.get(COOKIE)):
            log.warning("refused an admin page's events to %s: not its session", client_host(request))
            return JSONResponse({"message": "Not your session."}, status_code=403)
        return await call_next(request)

    @app.post("/admin/login")
    def log_in(login: Login, request: fastapi.Request):
        try:
            token = sessions.log_in(login.password, client=client_host(request))
        except LoginRefused as e:
            return JSONResponse({"ok": False, "message": str(e)}, status_code=401)
        response = JSONResponse({"ok": True, "message": ""})
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    @app.post("/admin/logout")
    def log_out(request: fastapi.Request):
        sessions.end(request.cookies.get(COOKIE))
        response = JSONResponse({"ok": True})
        response.delete_cookie(COOKIE, httponly=True, samesite="strict")
        return response

    @app.get("/admin/download/dataset")
    def download_dataset(request: fastapi.Request):
        if not sessions.active(request.cookies.get(COOKIE)):
            log.warning("refused a training-set download from %s: not logged in", client_host(request))
            return JSONResponse({"message": "Log in as admin first."}, status_code=403)
        found = admin.recent_run_file("dataset")
        if found is None:
            return JSONResponse({"message": "No retrain has left a training set."}, status_code=404)
        run, path = found
        return FileResponse(path, media_type="application/jsonl", filename=f"selfcog-run{run['id']}-dataset.jsonl")

    return gr.mount_gradio_app(app, demo, path="/", css=CSS, footer_links=["gradio"])


class WebServer(Server):
    """uvicorn (in Gradio's wrapper, which can also run it in a thread) that ends the pages' heartbeat
    streams as it stops, as Blocks.close() does: otherwise a graceful stop waits for every open page."""

    async def shutdown(self, sockets=None):
        for route in self.config.app.routes:
            if isinstance(route, Mount) and isinstance(route.app, GradioApp):
                route.app.stop_event.set()
        await super().shutdown(sockets)


def launch(app: fastapi.FastAPI, host: str, port: int, *, block: bool = True) -> WebServer:
    """Serve the app until Ctrl-C or SIGTERM; block=False returns at once, serving (close() stops it)."""
    # Answers being streamed get STOP_GRACE_S to finish; one cut short is stored as far as it got.
    server = WebServer(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                      timeout_graceful_shutdown=STOP_GRACE_S))
    if block:
        server.run()
    else:
        server.run_in_thread()
    return server
