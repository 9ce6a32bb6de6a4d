"""``GET /health``: what a load balancer or an operator asks a process.

Every role answers it: ``all`` and ``serve`` beside the UI (a route of the
Gradio app), ``train`` on a small HTTP server of its own (it has no UI). The
status code is 200 once the model is loaded and 503 before or when loading
failed, so a load balancer sends people only to replicas that can answer.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhf_chat.storage import lease, store

log = logging.getLogger(__name__)


def health(services) -> tuple[int, dict]:
    """(HTTP status, JSON body): role, the policy version served and the newest
    published, the reward version, votes stored, people waiting, and the
    trainer's heartbeat age (from the lease; null when no trainer holds it)."""
    worker = services.worker
    state = "error" if worker.load_error is not None else "ok" if worker.ready.is_set() else "loading"
    with services.sessions() as session:
        votes = store.count_votes(session)
        policy = store.latest_checkpoint(session, "policy")
        reward = store.latest_checkpoint(session, "reward")
        holder = lease.current(session)
    body = {
        "status": state,
        "role": services.config.deploy.role,
        "policy_version": worker.serving_version,
        "published_policy_version": policy.version if policy is not None else 0,
        "reward_version": reward.version if reward is not None else 0,
        "votes": votes,
        "queue": services.batcher.waiting() + worker.pending(),
        "trainer_host": holder.host if holder is not None else None,
        "trainer_heartbeat_age_s": _rounded(lease.heartbeat_age(holder)),
        "training": services.loop.status.state if services.loop is not None else None,
        "follow_problem": (services.follower.status.problem or None) if services.follower is not None else None,
    }
    return (200 if state == "ok" else 503), body


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def health_route(services):
    """The ``/health`` route for the Gradio app (``launch(app_kwargs={"routes": [...]})``).

    A plain function, so FastAPI runs it in its thread pool: the database
    read never blocks the event loop that streams people's answers.
    """
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute

    def endpoint() -> JSONResponse:
        code, body = health(services)
        return JSONResponse(body, status_code=code)

    return APIRoute("/health", endpoint, methods=["GET"])


def serve_health(services, host: str, port: int) -> ThreadingHTTPServer:
    """A background HTTP server that answers ``GET /health`` (the trainer's only page)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            if self.path.split("?")[0] != "/health":
                self.send_error(404, "only /health here: this process trains and has no UI")
                return
            try:
                code, body = health(services)
            except Exception as exc:  # the database is away: say so, do not hang the prober
                code, body = 503, {"status": "error", "role": services.config.deploy.role, "error": type(exc).__name__}
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args) -> None:  # probes every few seconds: keep them out of the log
            log.debug(fmt, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
