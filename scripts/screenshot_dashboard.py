"""Screenshot the Training tab of the app over an existing database (for the README).

    python scripts/screenshot_dashboard.py --db sqlite:///bench/out/sim2.db \
        --checkpoints bench/out/sim2-ckpt --out docs/dashboard.png

Serves the real app on loopback (training off, so the figures stay as the run
left them) and photographs it with headless Chromium from Debian's package.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

from rlhf_chat.config import AppConfig  # noqa: E402
from rlhf_chat.runtime import start_services  # noqa: E402
from rlhf_chat.serving.ui import build_demo, launch_options  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--out", default="docs/dashboard.png")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    cfg = AppConfig()
    cfg.store.db_url, cfg.store.checkpoint_dir = args.db, args.checkpoints
    services = start_services(cfg, train=False)
    services.worker.ready.wait()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo(services)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_options(cfg))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1700})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Training").click()
            page.wait_for_timeout(60_000)  # the timer's first refresh, the plots and the sampled probe answers (CPU)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        demo.close()
        services.stop()
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
