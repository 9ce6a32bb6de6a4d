"""rlhf-chat: the entry point (also what Hugging Face Spaces runs).

    python app.py [--role all|serve|train] [--model ID_OR_PATH] [--db URL] [--port N] [--no-4bit]

Environment variables RLHF_CHAT_ROLE, RLHF_CHAT_MODEL, RLHF_CHAT_DB and PORT do
the same. ``all`` (the default) is one process doing everything; beyond one
machine, run several ``serve`` replicas and one ``train`` process on one
database and one checkpoint folder (README, "Scaling out").
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from rlhf_chat.config import ROLES, add_common_args, config_from_args
from rlhf_chat.runtime import start_services
from rlhf_chat.serving.health import serve_health
from rlhf_chat.serving.ui import build_demo, launch_options
from rlhf_chat.storage.lease import LeaseHeld


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The app's command line."""
    parser = argparse.ArgumentParser(description="rlhf-chat: a chatbot that learns from your votes, live")
    add_common_args(parser)
    parser.add_argument("--port", type=int, default=None, help="port to serve on (default: $PORT or 7860)")
    parser.add_argument(
        "--role", choices=ROLES, default=None,
        help="all: UI and training in one process (default, $RLHF_CHAT_ROLE); serve: UI and serving copy only, "
        "following the published policy; train: the training loop only, with /health on --port",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start the services of this role and serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(parse_args(argv))
    try:
        services = start_services(cfg)
    except LeaseHeld as exc:
        print(f"rlhf-chat: not starting a second trainer: {exc}", file=sys.stderr)
        sys.exit(2)
    if cfg.deploy.role == "train":
        run_trainer(services, cfg.ui.host, cfg.ui.port)
        return
    demo = build_demo(services)
    demo.launch(server_name=cfg.ui.host, server_port=cfg.ui.port, **launch_options(cfg, services))


def run_trainer(services, host: str, port: int) -> None:
    """Train, answering ``/health`` on ``port``, until SIGTERM or Ctrl-C; then stop
    after the slice under way and give the lease back, so a new trainer can start at once."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = serve_health(services, host, port)
    logging.getLogger("rlhf_chat").info("training; GET http://%s:%d/health", host, port)
    stop.wait()
    server.shutdown()
    services.stop()


if __name__ == "__main__":
    main()
