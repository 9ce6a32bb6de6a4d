"""Admission: who may generate or vote right now, and who may try the admin password.

A public Space is shared; some visitors script it. Limits count per browser
session and per client address, so a fresh session from the same address does
not start afresh, while the address limit is several people's worth (a
classroom behind one router still chats). The address is the connection's,
or, only where the app is told to trust it (``ui.trust_proxy``, on by default
on a Space, whose proxy sets it), the first ``X-Forwarded-For`` entry: a
client elsewhere could write any header it likes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

from rlhf_chat.config import UIConfig

log = logging.getLogger(__name__)

WINDOW_S = 60.0  # limits are per minute


class SlidingWindow:
    """Events per key over the last ``window_s`` seconds, thread-safe.

    Keys whose events have all expired are dropped when the table is swept,
    so memory stays bounded by the keys active in one window.
    """

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._last_sweep = clock()

    def _recent(self, key: str, now: float) -> deque[float]:
        events = self._events.setdefault(key, deque())
        while events and now - events[0] >= self.window_s:
            events.popleft()
        return events

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < self.window_s:
            return
        self._last_sweep = now
        for key in [k for k, events in self._events.items() if not events or now - events[-1] >= self.window_s]:
            del self._events[key]

    def admit(self, limits: dict[str, int]) -> str | None:
        """Record one event under every key of ``limits`` if each is under its limit;
        else record nothing and return the first key that is full."""
        with self._lock:
            now = self.clock()
            self._sweep(now)
            for key, limit in limits.items():
                if len(self._recent(key, now)) >= limit:
                    return key
            for key in limits:
                self._events[key].append(now)
            return None

    def count(self, key: str) -> int:
        """Events under ``key`` in the window."""
        with self._lock:
            return len(self._recent(key, self.clock()))


class Admission:
    """The generation and vote limits of one app, per session and per address."""

    def __init__(self, cfg: UIConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.generations = SlidingWindow(clock=clock)
        self.votes = SlidingWindow(clock=clock)

    def _limits(self, per_session: int, session_id: str, address: str) -> dict[str, int]:
        return {f"session:{session_id}": per_session, f"address:{address}": per_session * self.cfg.people_per_address}

    def generation(self, session_id: str, address: str) -> str | None:
        """None if this session may have two more answers written now, else why not."""
        full = self.generations.admit(self._limits(self.cfg.generations_per_minute, session_id, address))
        if full is None:
            return None
        log.warning("generation limit reached (%s)", full)
        who = "you are" if full.startswith("session:") else "your network is"
        return f"Too many answers requested: {who} asking for new answers very fast. Please wait a minute."

    def vote(self, session_id: str, address: str) -> str | None:
        """None if this session may vote now, else why not."""
        full = self.votes.admit(self._limits(self.cfg.votes_per_minute, session_id, address))
        if full is None:
            return None
        log.warning("vote limit reached (%s)", full)
        return "You are voting very fast; please wait a few seconds and read the answers."


class AdminGuard:
    """Wrong admin passwords: counted per address, logged, and locked out after
    ``ui.admin_max_failures`` within ``ui.admin_lockout_s``."""

    def __init__(self, cfg: UIConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.failures = SlidingWindow(window_s=cfg.admin_lockout_s, clock=clock)

    def locked(self, address: str) -> bool:
        """Whether this address has used up its tries."""
        return self.failures.count(address) >= self.cfg.admin_max_failures

    def failed(self, address: str) -> None:
        """Count (and log) one wrong password from ``address``."""
        self.failures.admit({address: 10**9})
        count = self.failures.count(address)
        log.warning("wrong admin password from %s (%d in %.0f s)", address, count, self.cfg.admin_lockout_s)
        if count >= self.cfg.admin_max_failures:
            log.warning("admin locked for %s for %.0f s", address, self.cfg.admin_lockout_s)


def client_address(request, trust_proxy: bool) -> str:
    """Who is asking: the proxy's ``X-Forwarded-For`` first entry when trusted, else the
    connection's address; "local" for a direct call (tests, scripts)."""
    if request is None:
        return "local"
    if trust_proxy:
        forwarded = (getattr(request, "headers", None) or {}).get("x-forwarded-for", "")
        first = forwarded.split(",")[0].strip()
        if first:
            return first
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "unknown"
