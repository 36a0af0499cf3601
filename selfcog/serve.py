"""`selfcog serve`: one process, one model load, every front end.

The engine is loaded once and shared by the web page and the Telegram bot through one
ChatService; the retrain job runner runs here too, so a retrain asked for anywhere is picked up
here, trained in a worker subprocess, evaluated on the already-loaded weights, and swapped in.
"""

from __future__ import annotations

import logging
import signal
import threading

from selfcog.config import Settings
from store import Store

log = logging.getLogger(__name__)


def build_services(settings: Settings, store: Store):
    """The engine, chat service and admin actions, shared by every front end in this process."""
    from bot.admin import Admin
    from bot.chat import ChatService
    from bot.engines import Sampling, make_engine
    from bot.models import resolve_model

    model = resolve_model(settings.model, settings.cache_dir)
    engine = make_engine(settings, model, active_adapter=store.adapters.active)
    sampling = Sampling(settings.chat_temperature, settings.chat_top_p, settings.chat_repetition_penalty)
    chat = ChatService(store, engine, max_new_tokens=settings.max_new_tokens, sampling=sampling)
    return model, engine, chat, Admin(store, engine=engine, model=model)


def _stop_on_sigterm() -> None:
    """`docker stop` / `systemctl stop` send SIGTERM: take the same path as Ctrl-C, so replies being shown
    finish (or are stored and shown whole) instead of the process dying mid-answer."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def serve(settings: Settings, *, store: Store, web: bool, telegram: bool, jobs: bool) -> None:
    logging.getLogger().setLevel(logging.INFO)
    _stop_on_sigterm()
    model, engine, chat, admin = build_services(settings, store)
    stop = threading.Event()

    if jobs:
        from finetune.jobs import JobRunner

        JobRunner(job_settings(settings, engine), store, model=model, engine=engine).start(stop)

    telegram_thread = None
    if telegram and settings.telegram_token:
        from bot.telegram import run_bot_in_thread

        telegram_thread = run_bot_in_thread(chat, admin, token=settings.telegram_token,
                                            base_url=settings.telegram_api_url, admin_ids=settings.admin_ids, stop=stop,
                                            concurrency=engine.capacity)
    elif telegram:
        log.info("TELEGRAM_BOT_TOKEN is not set: the Telegram bot is off")

    try:
        if web:
            from ui.app import build_app, launch

            launch(build_app(chat, admin, admin_password=settings.admin_password), settings.host, settings.port)
        elif telegram_thread is not None:
            telegram_thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        if telegram_thread is not None:
            from bot.telegram import STOP_GRACE_S

            # Replies finish or are stored, and the last updates are confirmed (else Telegram re-sends them).
            telegram_thread.join(timeout=STOP_GRACE_S + 10)
        engine.close()


def job_settings(settings: Settings, engine=None):
    """What the retrain pipeline needs to know, from the settings (and the engine's device)."""
    from finetune.jobs import JobSettings

    device = engine.device if engine is not None else "cpu"
    return JobSettings(data_dir=settings.data_dir, cache_dir=settings.cache_dir, device=device,
                       retrain_every_hours=settings.retrain_every_hours,
                       retrain_min_corrections=settings.retrain_min_corrections, gate=settings.gate,
                       trainer=settings.trainer,
                       prepare_ahead=settings.prepare_ahead == "on" or (settings.prepare_ahead == "auto"
                                                                        and device.startswith("cuda")))
