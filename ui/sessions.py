"""Admin sessions: the server keeps them; the browser holds only a random token in a cookie.

    >>> sessions = AdminSessions("s3cret", idle_s=3600)
    >>> token = sessions.log_in("s3cret", client="203.0.113.7")   # LoginRefused with the reason otherwise
    >>> sessions.active(token)                                     # True until logout or an idle hour
    >>> sessions.end(token)

The token travels only in an HttpOnly, SameSite=Strict cookie (ui/app.py sets it), never in a URL,
so Gradio's session_hash (which does travel in URLs) grants nothing, and once an admin page uses a
session_hash, its event stream answers only to that admin's cookie (``bind``, ``may_read``). A session ends at logout,
after ``idle_s`` without an admin action, after ``max_age_s`` in any case, and when the server stops.

Wrong passwords slow logins down, per client and for everyone together: after a few free tries each
failure doubles the wait (``Backoff``), and while a wait runs even the right password is refused.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

from bot.errors import UserError

log = logging.getLogger(__name__)

COOKIE = "selfcog_admin"
IDLE_S = 3600.0  # an hour without an admin action logs out
MAX_AGE_S = 12 * 3600.0  # and any session ends after twelve hours


def client_host(request) -> str:
    """Who made a request (a Starlette or Gradio request), for the log and the per-client throttle."""
    return request.client.host if request.client else "?"


class LoginRefused(UserError):
    """A wrong password, or too many of them; the message says which, and how long to wait."""


class Backoff:
    """Exponential backoff after failures: `free` failures cost nothing, each one after that doubles
    the wait (first_wait_s, 2×, 4×, … up to max_wait_s). A key that fails no more for forget_s is forgotten."""

    def __init__(self, *, free: int, first_wait_s: float, max_wait_s: float, forget_s: float = 3600.0):
        self.free, self.first_wait_s, self.max_wait_s, self.forget_s = free, first_wait_s, max_wait_s, forget_s
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (failures in a row, time of the last one)

    def wait_left(self, key: str, now: float) -> float:
        failures, last = self._failures.get(key, (0, 0.0))
        if failures <= self.free or now - last > self.forget_s:
            return 0.0
        wait = min(self.max_wait_s, self.first_wait_s * 2 ** (failures - self.free - 1))
        return max(0.0, last + wait - now)

    def failed(self, key: str, now: float) -> None:
        failures, last = self._failures.get(key, (0, now))
        self._failures[key] = (1 if now - last > self.forget_s else failures + 1, now)
        if len(self._failures) > 10_000:  # many clients: drop the ones long quiet
            self._failures = {k: v for k, v in self._failures.items() if now - v[1] <= self.forget_s}

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)


@dataclass
class Session:
    client: str
    started: float
    seen: float  # the last admin action


class AdminSessions:
    def __init__(self, password: str, *, idle_s: float = IDLE_S, max_age_s: float = MAX_AGE_S,
                 per_client: Backoff | None = None, everyone: Backoff | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """per_client / everyone: the login throttles (defaults: 5 free tries per client, then 2 s,
        4 s, … up to 15 min; 20 free tries for all clients together, then up to a minute)."""
        if not password:
            raise ValueError("the admin page needs a password (build_app makes a one-time token when none is set)")
        self._password = password.encode()
        self.idle_s, self.max_age_s = idle_s, max_age_s
        self.per_client = per_client or Backoff(free=5, first_wait_s=2, max_wait_s=900)
        self.everyone = everyone or Backoff(free=20, first_wait_s=1, max_wait_s=60)
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._readers: dict[str, str] = {}  # Gradio session_hash -> the token of the admin page using it
        self._lock = threading.Lock()

    def log_in(self, password: str, *, client: str) -> str:
        """A new session's token for the right password; LoginRefused("Wrong password…" / "Too many attempts…")."""
        with self._lock:
            now = self._clock()
            wait = max(self.per_client.wait_left(client, now), self.everyone.wait_left("*", now))
            if wait:
                log.warning("refused an admin login from %s: throttled for %.0f s more", client, wait)
                raise LoginRefused(f"Too many attempts — wait {math.ceil(wait)} s, then try again.")
            if not hmac.compare_digest((password or "").encode(), self._password):
                self.per_client.failed(client, now)
                self.everyone.failed("*", now)
                log.warning("refused an admin login from %s: wrong password", client)
                raise LoginRefused("Wrong password: access refused.")
            self.per_client.succeeded(client)
            self._sessions = {t: s for t, s in self._sessions.items() if self._alive(s, now)}
            self._readers = {h: t for h, t in self._readers.items() if t in self._sessions}
            token = secrets.token_urlsafe(32)
            self._sessions[token] = Session(client, now, now)
        log.info("admin logged in from %s", client)
        return token

    def active(self, token: str | None, *, touch: bool = True) -> bool:
        """Whether the token is a live session; touch=False for the page's own timer, which must not
        keep an unattended page logged in."""
        with self._lock:
            session = self._sessions.get(token or "")
            now = self._clock()
            if session is None or not self._alive(session, now):
                self._sessions.pop(token or "", None)
                return False
            if touch:
                session.seen = now
            return True

    def end(self, token: str | None) -> None:
        with self._lock:
            if self._sessions.pop(token or "", None) is not None:
                log.info("admin logged out")
            self._readers = {h: t for h, t in self._readers.items() if t != token}

    def bind(self, session_hash: str, token: str | None) -> None:
        """The admin page of this session uses this Gradio session_hash: from now on only a request
        carrying the same session may read its events (see may_read)."""
        with self._lock:
            self._readers[session_hash] = token or ""

    def may_read(self, session_hash: str | None, token: str | None) -> bool:
        """Whether a request may read the event stream of session_hash (/gradio_api/queue/data). The
        hash travels in URLs; once an admin page uses it, only that admin's cookie reads its events."""
        with self._lock:
            owner = self._readers.get(session_hash or "")
            if owner is None:
                return True
            session = self._sessions.get(owner)
            if session is not None and self._alive(session, self._clock()):
                return token == owner
            del self._readers[session_hash]  # that session ended: the hash is an ordinary chat page's again
            return True

    def _alive(self, session: Session, now: float) -> bool:
        return now - session.seen < self.idle_s and now - session.started < self.max_age_s
