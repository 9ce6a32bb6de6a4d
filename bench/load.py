"""Benchmark: several people using the app at once, over HTTP, and every vote stored once.

    python bench/load.py [--users 8] [--seconds 120] [--tiny] [--turns 4] [--db URL] [--train]
    python bench/load.py --burst 1,4,8,16 [--tiny]

Serves the real app on 127.0.0.1 (start_services, build_demo, launch, as app.py
does; the training loop only with --train), then starts ``--users`` simulated
people at once, each a ``gradio_client.Client`` in its own thread, so each has
its own Gradio session and with it its own conversation state on the server.
For ``--seconds`` each person sends a message (``/respond``, which streams two
answers; the client returns the final output) and votes "A is better"
(``/vote_a``), starting a new conversation every ``--turns`` messages as people
do, so the context stays realistic rather than growing without end.

What it measures: respond and vote latency (median, p95, max), requests,
acknowledged votes, refusals and errors. What it checks: every vote the app
acknowledged ("Recorded...") is in the database exactly once: the vote count,
the per-session counts and the assistant messages that votes add all match
what the clients were told. A vote can be stored only once per comparison by
construction (an atomic UPDATE ... WHERE choice IS NULL); this checks that under
concurrency nothing is lost and nothing is added behind a client's back.

All generation goes through the one model worker; the pairs people wait for
together are written in one batched call (batcher.py). ``--burst`` measures
exactly that: N fresh people press Enter at the same moment, for each N, once
with one pair per call (``ui.batch_people`` 1, the old way) and once batched,
in the same run, so the speed-up is a ratio of figures taken minutes apart.
Exits 1 when an acknowledged vote is missing or extra, or when any request failed.
"""

from __future__ import annotations

import os

# Before gradio is imported (through rlhf_chat.serving.ui): no telemetry, no hub, only loopback.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from common import PROMPTS, machine, summary  # noqa: E402
from gradio_client import Client  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from rlhf_chat.config import AppConfig, ModelConfig, apply_overrides  # noqa: E402
from rlhf_chat.model.loading import prepare_bundled_model, write_tiny_model  # noqa: E402
from rlhf_chat.runtime import start_services  # noqa: E402
from rlhf_chat.serving.ui import build_demo, launch_options  # noqa: E402
from rlhf_chat.storage import store  # noqa: E402
from rlhf_chat.storage.tables import Comparison, Message  # noqa: E402

OUT_NOTICE = 3  # the notice Markdown among the endpoints' outputs (gr.State is not returned)
RATE_LIMITED = "You are voting very fast"
DB_BUSY = "The database is busy"  # ui.DB_BUSY: nothing stored, the person is asked to try again
TOO_MANY_ANSWERS = "Too many answers requested"  # admission.generation: the per-minute limit, as meant
RATE_LIMIT_WAIT_S = 2.0  # then vote again: the pair is still on screen, as for a person
MAX_VOTE_TRIES = 40  # 80 s of waiting covers the one-minute rate-limit window
BARRIER_TIMEOUT_S = 300.0  # connecting takes seconds; a hang here is a bug, not a slow run


@dataclass
class UserStats:
    """What one simulated person saw; merged at the end."""

    respond_s: list[float] = field(default_factory=list)
    vote_s: list[float] = field(default_factory=list)
    respond_requests: int = 0
    vote_requests: int = 0
    acknowledged: int = 0  # votes answered "Recorded..."
    rate_limited: int = 0  # votes (or messages) refused by the per-session flood limits (then retried)
    db_busy: int = 0  # requests refused because the database stayed locked (vote retried, message dropped)
    errors: list[str] = field(default_factory=list)


def free_port() -> int:
    """A port nobody listens on now, picked by the OS."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notice_of(output) -> str:
    """The notice text of an endpoint's outputs ('' when the shape is unexpected)."""
    try:
        return str(output[OUT_NOTICE] or "")
    except (TypeError, IndexError, KeyError):
        return ""


def person(url: str, index: int, clock: dict, turns: int, stats: UserStats, ready: threading.Barrier) -> None:
    """One simulated person: message, vote A, repeat until the deadline.

    The vote after the last message is still cast past the deadline, so no
    pair is left open by the benchmark itself and the count check stays exact.
    """
    client = None
    try:
        client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    except Exception as exc:  # counted, and this person sits the run out
        stats.errors.append(f"user {index}: connect: {type(exc).__name__}: {exc}")
    try:
        ready.wait(BARRIER_TIMEOUT_S)  # everyone starts at once: the point is the concurrency
    except threading.BrokenBarrierError:
        stats.errors.append(f"user {index}: the others never connected")
        ready_failed = True
    else:
        ready_failed = False
    if client is None or ready_failed:
        if client is not None:
            client.close()
        return
    deadline = clock["deadline"]  # set by the barrier's action before anyone is released
    try:
        turn = 0
        while time.monotonic() < deadline:
            if turn and turn % turns == 0:
                client.predict(api_name="/new_conversation")
            message = PROMPTS[(index + turn) % len(PROMPTS)]
            turn += 1
            if not respond_once(client, message, index, stats):
                client.predict(api_name="/new_conversation")  # back to a known state
                continue
            if not vote_once(client, index, stats):
                client.predict(api_name="/new_conversation")
    except Exception as exc:  # even the recovery failed: this person stops
        stats.errors.append(f"user {index}: {type(exc).__name__}: {exc}")
    finally:
        client.close()


def respond_once(client, message: str, index: int, stats: UserStats) -> bool:
    """Send a message; True when two answers are on screen to vote on."""
    stats.respond_requests += 1
    start = time.perf_counter()
    try:
        output = client.predict(message, api_name="/respond")
    except Exception as exc:
        stats.errors.append(f"user {index}: respond: {type(exc).__name__}: {exc}")
        return False
    stats.respond_s.append(time.perf_counter() - start)
    notice = notice_of(output)
    if notice.startswith(DB_BUSY):
        stats.db_busy += 1
        return False
    if notice.startswith(TOO_MANY_ANSWERS):  # the app working as meant: nothing stored, try later
        stats.rate_limited += 1
        return False
    if "Which answer is better?" not in notice:
        stats.errors.append(f"user {index}: respond refused: {notice!r}")
        return False
    return True


def vote_once(client, index: int, stats: UserStats) -> bool:
    """Vote "A is better" (no strength); True when the app acknowledged it.

    A refusal by the flood limit is the app working as meant (people voting
    faster than they can read), so it is waited out and counted, not an error;
    so is "the database is busy", which stores nothing and asks for another click.
    """
    for _ in range(MAX_VOTE_TRIES):
        stats.vote_requests += 1
        start = time.perf_counter()
        try:
            output = client.predict(None, api_name="/vote_a")
        except Exception as exc:
            stats.errors.append(f"user {index}: vote: {type(exc).__name__}: {exc}")
            return False
        stats.vote_s.append(time.perf_counter() - start)
        notice = notice_of(output)
        if notice.startswith("Recorded"):
            stats.acknowledged += 1
            return True
        if notice.startswith(RATE_LIMITED):
            stats.rate_limited += 1
            time.sleep(RATE_LIMIT_WAIT_S)
            continue
        if notice.startswith(DB_BUSY):  # not stored, not acknowledged: click again, as the notice asks
            stats.db_busy += 1
            time.sleep(RATE_LIMIT_WAIT_S)
            continue
        stats.errors.append(f"user {index}: vote refused: {notice!r}")
        return False
    stats.errors.append(f"user {index}: vote still rate-limited after {MAX_VOTE_TRIES} tries")
    return False


def burst(url: str, people: int) -> tuple[list[float], list[str]]:
    """``people`` fresh clients send one message at the same moment: each one's
    wait for its two answers (the final output), and any errors. Each then
    votes, untimed, so that no pair is left open."""
    clients = [Client(url, verbose=False, analytics_enabled=False, download_files=False) for _ in range(people)]
    ready = threading.Barrier(people)
    waits: list[float] = [0.0] * people
    errors: list[str] = []

    def one(k: int) -> None:
        ready.wait(BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        try:
            notice = notice_of(clients[k].predict(PROMPTS[k % len(PROMPTS)], api_name="/respond"))
            waits[k] = time.perf_counter() - start
            if "Which answer is better?" not in notice:
                errors.append(f"person {k}: {notice!r}")
            elif not notice_of(clients[k].predict(None, api_name="/vote_a")).startswith("Recorded"):
                errors.append(f"person {k}: vote not recorded")
        except Exception as exc:
            errors.append(f"person {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(k,)) for k in range(people)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    return waits, errors


def run_bursts(services, url: str, sizes: list[int]) -> bool:
    """Each burst size twice in the same run: one pair per call (the old way) and
    batched (``ui.batch_people``); prints median and slowest wait and the ratio."""
    batched = services.config.ui.batch_people
    ok = True
    print("people at once | one pair per call: median / slowest | batched: median / slowest | calls | speed-up (median)")
    for n in sizes:
        row = {}
        for label, max_people in (("serial", 1), ("batched", batched)):
            services.batcher.max_people = max_people
            calls_before = len(services.batcher.batch_sizes)
            waits, errors = burst(url, n)
            calls = list(services.batcher.batch_sizes)[calls_before:]
            row[label] = (statistics.median(waits), max(waits), calls)
            for e in errors:
                print(f"error ({label}, {n} people): {e}")
            ok = ok and not errors
        (sm, sx, _), (bm, bx, calls) = row["serial"], row["batched"]
        print(f"{n} | {sm:.1f} s / {sx:.1f} s | {bm:.1f} s / {bx:.1f} s | {calls} | {sm / bm:.2f}x")
    services.batcher.max_people = batched
    return ok


def latency_line(values: list[float]) -> str:
    """median / p95 / min / max, or a dash when nothing was timed."""
    return summary(values) if values else "-"


def database_marks(sessions) -> tuple[int, int, int]:
    """(votes, newest comparison id, newest message id): what was there before the run."""
    with sessions() as session:
        return (
            store.count_votes(session),
            session.scalar(select(func.max(Comparison.id))) or 0,
            session.scalar(select(func.max(Message.id))) or 0,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8, help="simulated people at once (default 8)")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long each person keeps going (default 120)")
    parser.add_argument("--turns", type=int, default=4, help="messages per conversation before a new one (default 4)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of the bundled one")
    parser.add_argument("--db", default=None, help="SQLAlchemy URL (default: a fresh SQLite file in a temp folder)")
    parser.add_argument("--train", action="store_true", help="run the training loop too, as the app does")
    parser.add_argument(
        "--burst", default="", metavar="N,N,...",
        help="instead: N people send one message at the same moment, for each N (e.g. 1,4,8,16), "
             "one pair per call against batched, in the same run",
    )
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE",
                        help="override a setting, as the app's --set (e.g. ui.batch_wait_s=0.2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    tmp = Path(tempfile.mkdtemp(prefix="rlhf-chat-load-"))
    cfg = AppConfig()
    cfg.store.db_url = args.db or f"sqlite:///{tmp / 'feedback.db'}"
    cfg.store.checkpoint_dir = str(tmp / "checkpoints")
    apply_overrides(cfg, args.set)
    # Every simulated person comes from 127.0.0.1: one address, which may do as
    # much as this many people (ui.people_per_address), so the limits measure nothing here.
    cfg.ui.people_per_address = max(cfg.ui.people_per_address, args.users, *_sizes(args.burst))
    if args.tiny:
        bundled = prepare_bundled_model(ModelConfig().cache_dir)  # its tokenizer and chat template
        cfg.model.name = str(write_tiny_model(tmp / "tiny-model", str(bundled)))

    start = time.perf_counter()
    services = start_services(cfg, train=args.train)
    demo = None
    try:
        if not services.worker.ready.wait(600):
            print(f"the model did not load: {services.worker.load_error}", file=sys.stderr)
            return 1
        if services.worker.load_error is not None:
            print(f"the model failed to load: {services.worker.load_error}", file=sys.stderr)
            return 1
        loaded_s = time.perf_counter() - start
        port = free_port()
        demo = build_demo(services)
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options(cfg))
        url = f"http://127.0.0.1:{port}/"
        before_votes, before_comparison, before_message = database_marks(services.sessions)

        print(f"machine: {machine()}")
        model = "tiny random Llama (2 layers, 64 wide)" if args.tiny else "bundled SmolLM2-135M-Instruct"
        print(
            f"model: {model}, weights: {cfg.model.weights}, loaded in {loaded_s:.1f} s; "
            f"{cfg.sampling.max_new_tokens} new tokens per answer; training loop: {'on' if args.train else 'off'}"
        )
        print(f"database: {cfg.store.db_url}")
        print(f"batching: up to {cfg.ui.batch_people} people a call, waiting {cfg.ui.batch_wait_s:g} s for more")
        if args.burst:
            return 0 if run_bursts(services, url, _sizes(args.burst)) else 1
        print(f"{args.users} users at once for {args.seconds:.0f} s, a new conversation every {args.turns} messages")

        stats = [UserStats() for _ in range(args.users)]
        # Everyone connects first (fetching the app's config is not part of the run),
        # then all start together; the barrier's action fixes the clock as they go.
        clock: dict[str, float] = {}

        def start_clock() -> None:
            clock["start"] = time.monotonic()
            clock["deadline"] = clock["start"] + args.seconds

        ready = threading.Barrier(args.users + 1, action=start_clock)
        threads = [
            threading.Thread(target=person, args=(url, i, clock, args.turns, stats[i], ready), name=f"user-{i}")
            for i in range(args.users)
        ]
        for t in threads:
            t.start()
        try:
            ready.wait(BARRIER_TIMEOUT_S)
        except threading.BrokenBarrierError:
            clock.setdefault("start", time.monotonic())
        for t in threads:
            t.join()
        wall = time.monotonic() - clock["start"]

        after_votes, _, _ = database_marks(services.sessions)
        with services.sessions() as session:
            per_session = Counter(
                session.scalars(
                    select(Comparison.session_id).where(
                        Comparison.id > before_comparison, Comparison.choice.is_not(None)
                    )
                )
            )
            open_pairs = session.scalar(
                select(func.count()).select_from(Comparison).where(
                    Comparison.id > before_comparison, Comparison.choice.is_(None)
                )
            )
            assistant_messages = session.scalar(
                select(func.count()).select_from(Message).where(
                    Message.id > before_message, Message.role == "assistant"
                )
            )
    finally:
        if demo is not None:
            demo.close()
        services.stop()

    respond_s = [x for s in stats for x in s.respond_s]
    vote_s = [x for s in stats for x in s.vote_s]
    acknowledged = sum(s.acknowledged for s in stats)
    errors = [e for s in stats for e in s.errors]
    stored = after_votes - before_votes
    user_counts = sorted(s.acknowledged for s in stats if s.acknowledged)
    session_counts = sorted(per_session.values())

    print(f"ran {wall:.1f} s (the last replies finish after the deadline)")
    print(
        f"requests: {sum(s.respond_requests for s in stats)} respond, {sum(s.vote_requests for s in stats)} vote; "
        f"votes acknowledged: {acknowledged} ({acknowledged / wall * 60:.1f} a minute); "
        f"rate-limited (retried): {sum(s.rate_limited for s in stats)}; "
        f"database busy: {sum(s.db_busy for s in stats)}; errors: {len(errors)}"
    )
    print(f"respond latency: {latency_line(respond_s)}")
    print(f"vote latency: {latency_line(vote_s)}")
    print(f"per user, votes acknowledged: {[s.acknowledged for s in stats]}")
    checks = {
        "stored votes == acknowledged": stored == acknowledged,
        "per-session stored == per-user acknowledged": session_counts == user_counts,
        "assistant messages == acknowledged": assistant_messages == acknowledged,
    }
    print(
        f"database: {stored} votes stored, {acknowledged} acknowledged; per session {session_counts}; "
        f"{assistant_messages} assistant messages; {open_pairs} pairs left without a vote"
    )
    for name, ok in checks.items():
        print(f"check {name}: {'ok' if ok else 'FAILED'}")
    for error in errors[:10]:
        print(f"error: {error}")
    if len(errors) > 10:
        print(f"... and {len(errors) - 10} more errors")
    return 0 if all(checks.values()) and not errors else 1


def _sizes(text: str) -> list[int]:
    """"1,4,8" -> [1, 4, 8]."""
    return [int(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    sys.exit(main())
