"""rlhf-chat: the entry point (also what Hugging Face Spaces runs).

    python app.py [--model ID_OR_PATH] [--db URL] [--port N] [--no-4bit]

Environment variables RLHF_CHAT_MODEL, RLHF_CHAT_DB and PORT do the same.
"""

from __future__ import annotations

import argparse
import logging

from rlhf_chat.config import add_common_args, config_from_args
from rlhf_chat.serving.runtime import start_services
from rlhf_chat.serving.ui import build_demo, launch_options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The app's command line."""
    parser = argparse.ArgumentParser(description="rlhf-chat: a chatbot that learns from your votes, live")
    add_common_args(parser)
    parser.add_argument("--port", type=int, default=None, help="port to serve on (default: $PORT or 7860)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start the services and serve the UI until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(parse_args(argv))
    services = start_services(cfg)
    demo = build_demo(services)
    demo.launch(server_name=cfg.ui.host, server_port=cfg.ui.port, **launch_options(cfg))


if __name__ == "__main__":
    main()
