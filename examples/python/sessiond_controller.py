"""The sessiond controller contract for a FastAPI application.

Drop this module into your application, keep the sessions your process holds in
a ``SessionRegistry``, and mount ``router(registry)``. sessiond then reads

    GET  /internal/sessions                     the live list
    POST /internal/sessions/{session_id}/stop   stop one: 200, or 404 if unknown

The document it serves is the one ``docs/controller-contract.md`` describes:
``instance`` and ``boot_id`` first (so sessiond's boot-id checks read a few
bytes), ``generated_at`` by this process's clock, one entry per live session,
and the application's cumulative counters.

One process per URL. The list is everything *this process* holds. Run the
endpoint with one worker per URL (or give each worker its own port and its own
``[[controller]]``), or back the registry with state all workers share. The
boot id is made per process, after any fork, so that sessiond can tell
several processes apart if they do end up behind one URL.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from fastapi import APIRouter, Header, HTTPException, Response

LIVE_STATES = ("creating", "active", "running", "paused")
log = logging.getLogger("sessiond_controller")
LOOKUP_REASONS = ("found", "invalid_format", "never_existed", "deleted")
# Upper bounds, in seconds, of the session creation-time histogram.
CREATE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Session:
    owner_id: str
    state: str
    started_at: str


@dataclass
class _Counters:
    sessions_created: int = 0
    sessions_reused: int = 0
    lookups: Dict[str, int] = field(default_factory=lambda: {r: 0 for r in LOOKUP_REASONS})
    cleanups: Dict[str, int] = field(default_factory=lambda: {"succeeded": 0, "failed": 0})
    create_buckets: Dict[float, int] = field(default_factory=lambda: {b: 0 for b in CREATE_BUCKETS})
    create_count: int = 0
    create_sum: float = 0.0


class SessionRegistry:
    """The sessions this process holds in memory, and the counters sessiond
    re-exports. Thread-safe: FastAPI may call it from a thread pool."""

    def __init__(self, instance: str, on_stop: Optional[Callable[[str], None]] = None):
        self.instance = instance
        self._on_stop = on_stop
        self._lock = threading.Lock()
        self._sessions: Dict[str, _Session] = {}
        self._counters = _Counters()
        self._pid: Optional[int] = None
        self._boot_id = ""

    @property
    def boot_id(self) -> str:
        """A new id for every process: made on first use in this process, so a
        registry created before a fork still gets one id per worker."""
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._boot_id = str(uuid.uuid4())
                # A forked copy of another process's memory is not ours.
                self._sessions.clear()
                self._counters = _Counters()
            return self._boot_id

    def add(self, session_id: str, owner_id: str, state: str = "active") -> None:
        if state not in LIVE_STATES:
            raise ValueError(f"{state!r} is not a live state")
        _ = self.boot_id
        with self._lock:
            self._sessions[session_id] = _Session(owner_id, state, _now())
            self._counters.sessions_created += 1

    def set_state(self, session_id: str, state: str) -> None:
        if state not in LIVE_STATES:
            raise ValueError(f"{state!r} is not a live state")
        with self._lock:
            self._sessions[session_id].state = state

    def remove(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def holds(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def count_reuse(self) -> None:
        with self._lock:
            self._counters.sessions_reused += 1

    def count_lookup(self, reason: str) -> None:
        with self._lock:
            self._counters.lookups[reason] += 1

    def observe_create(self, seconds: float) -> None:
        """Records how long creating a session took (from the request to the
        row being stored), for the creation-latency histogram."""
        with self._lock:
            c = self._counters
            for bound in CREATE_BUCKETS:
                if seconds <= bound:
                    c.create_buckets[bound] += 1
            c.create_count += 1
            c.create_sum += seconds

    def count_cleanup(self, succeeded: bool) -> None:
        with self._lock:
            self._counters.cleanups["succeeded" if succeeded else "failed"] += 1

    def document(self) -> dict:
        boot_id = self.boot_id
        with self._lock:
            return {
                "instance": self.instance,
                "boot_id": boot_id,
                "generated_at": _now(),
                "sessions": [
                    {"session_id": sid, "owner_id": s.owner_id, "state": s.state, "started_at": s.started_at}
                    for sid, s in self._sessions.items()
                ],
                "counters": {
                    "sessions_created": self._counters.sessions_created,
                    "sessions_reused": self._counters.sessions_reused,
                    "lookups": dict(self._counters.lookups),
                    "cleanups": dict(self._counters.cleanups),
                    "create_seconds": {
                        "buckets": {
                            **{repr(b): n for b, n in self._counters.create_buckets.items()},
                            "+Inf": self._counters.create_count,
                        },
                        "sum": self._counters.create_sum,
                        "count": self._counters.create_count,
                    },
                },
            }

    def stop(self, session_id: str) -> bool:
        """Stops a session: the application's own cleanup, then forgets it."""
        with self._lock:
            held = session_id in self._sessions
        if not held:
            return False
        if self._on_stop is not None:
            self._on_stop(session_id)
        gone = self.remove(session_id)
        self.count_cleanup(gone)
        return gone


def router(registry: SessionRegistry, token: Optional[str] = None, prefix: str = "/internal/sessions") -> APIRouter:
    """The two endpoints of the contract. With ``token`` set, every request must
    carry ``Authorization: Bearer <token>`` (sessiond's ``token_file``)."""
    r = APIRouter()

    def authorize(authorization: Optional[str]) -> None:
        if token is not None and authorization != f"Bearer {token}":
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")

    @r.get(prefix)
    def list_sessions(authorization: Optional[str] = Header(default=None)) -> dict:
        authorize(authorization)
        return registry.document()

    # The highest leader term seen: a stop from a replica that has since lost
    # the lease (it was paused after its last check) carries a lower one.
    highest_term = {"term": 0}
    term_lock = threading.Lock()

    @r.post(prefix + "/{session_id}/stop")
    def stop_session(
        session_id: str,
        authorization: Optional[str] = Header(default=None),
        sessiond_actor: Optional[str] = Header(default=None),
        sessiond_term: Optional[str] = Header(default=None),
    ) -> Response:
        authorize(authorization)
        log.info("stop %s requested by %s (term %s)", session_id, sessiond_actor or "?", sessiond_term or "-")
        if sessiond_term is not None and sessiond_term.isdigit():
            with term_lock:
                if int(sessiond_term) < highest_term["term"]:
                    return Response(
                        content='{"error": "a newer sessiond leader has been seen"}',
                        status_code=409,
                        media_type="application/json",
                    )
                highest_term["term"] = int(sessiond_term)
        # 404 means "not here": sessiond reads it as gone, as the contract says.
        if registry.stop(session_id):
            return Response(content='{"stopped": true}', media_type="application/json")
        return Response(content='{"error": "session not found"}', status_code=404, media_type="application/json")

    return r
