"""Benchmark: how long from ``python app.py`` to an app ready to serve.

    python bench/startup.py [--runs 2] [--port 7871]

Starts the app (the bundled model, a fresh database in a temporary folder) and
polls ``GET /health`` until it answers 200 (the model loaded, restored and
warmed up, the UI listening); prints the seconds, then stops the app. The
decoding path compiles nothing but the native kernels (``model/native.py``),
about a second with ``cc`` on the first start, loaded from the model cache
after: the first run here pays it where the cache has none. Target on a
2-core CPU: at most 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import machine

ROOT = Path(__file__).resolve().parents[1]


def time_start(port: int, timeout_s: float = 300.0) -> float:
    """Seconds until /health says ok, for one start of the app on a fresh database."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-start-"))
    env = {**os.environ, "RLHF_CHAT_DB": f"sqlite:///{tmp / 'feedback.db'}", "RLHF_CHAT_CHECKPOINTS": str(tmp / "ckpt")}
    start = time.perf_counter()
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout_s:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if json.load(reply).get("status") == "ok":
                        return time.perf_counter() - start
            except OSError:
                pass
            if app.poll() is not None:
                raise RuntimeError(f"the app exited with {app.returncode} before it was ready")
            time.sleep(0.25)
        raise TimeoutError(f"not ready within {timeout_s:.0f} s")
    finally:
        app.send_signal(signal.SIGINT)
        try:
            app.wait(30)
        except subprocess.TimeoutExpired:
            app.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--port", type=int, default=7871)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    times = [time_start(args.port) for _ in range(args.runs)]
    print("ready to serve (GET /health 200) after: " + ", ".join(f"{t:.1f} s" for t in times))


if __name__ == "__main__":
    main()
