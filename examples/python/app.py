"""A small application around the reference controller, for trying sessiond
against it (and for sessiond's own tests). A real application also writes a
row for each session in its database; here the caller does that.

    POST /sessions                 {"owner_id": "..."} -> a new session in this process
    POST /sessions/{id}/forget     a cleanup that cleared memory but not the row
    GET  /internal/sessions        the contract's list (sessiond_controller)
    POST /internal/sessions/{id}/stop

Run one process:          uvicorn app:app --port 8080
Several behind one port:  python serve.py --port 8080 --processes 3
"""

import datetime
import os
import secrets
import time

from fastapi import FastAPI
from pydantic import BaseModel

from sessiond_controller import SessionRegistry, router

registry = SessionRegistry(instance=os.environ.get("CONTROLLER_INSTANCE", "ctrl-a"))
app = FastAPI(title="sessiond reference controller")
app.include_router(router(registry, token=os.environ.get("CONTROLLER_TOKEN")))


class NewSession(BaseModel):
    owner_id: str
    state: str = "active"


@app.post("/sessions")
def create(new: NewSession) -> dict:
    started = time.monotonic()
    now = datetime.datetime.now(datetime.timezone.utc)
    session_id = f"exec_{now:%Y%m%d_%H%M%S}_{secrets.token_hex(4)}"
    registry.add(session_id, new.owner_id, new.state)
    # Your application stores the row here; time the whole create.
    registry.observe_create(time.monotonic() - started)
    return {"session_id": session_id, "boot_id": registry.boot_id, "pid": os.getpid()}


@app.post("/sessions/{session_id}/forget")
def forget(session_id: str) -> dict:
    return {"forgotten": registry.remove(session_id)}
