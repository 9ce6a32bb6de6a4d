"""Soak: simulated people use the app for a long while; memory, latency and disk over time.

    python bench/soak.py [--people 8] [--minutes 60] [--window-minutes 5] [--out DIR]
                         [--model ID_OR_PATH | --tiny] [--set GROUP.FIELD=VALUE ...]

Starts the app as ``python app.py`` starts it (a subprocess on a free port,
training on), with a database and a checkpoint folder of its own in a
temporary folder (``RLHF_CHAT_DB``, ``RLHF_CHAT_CHECKPOINTS``). ``--people``
simulated people, each a ``gradio_client.Client`` (a session of its own), chat
as ``bench/load.py``'s people do, and also, now and then, ask for two new
answers (Regenerate), press Continue after a vote, or write an answer of
their own; each paces itself under the app's per-minute limit, as a person
reading the answers would.

Every ``--window-minutes`` it records: the resident memory of the app process
and its children (``VmRSS``) at the window's end and the highest of the
readings taken every ``MEMORY_EVERY_S`` seconds within it, the median and p95 of the time to two answers in
that window, the database's size (with SQLite's journal files), the checkpoint
folder's size, errors so far, and votes (and written answers) acknowledged
against those stored. At the end it prints the table, checks that nothing
errored and every acknowledged vote and written answer is stored, and writes
``soak.json``, ``soak.csv`` and ``soak.png`` (memory, latency and disk over
time) to ``--out``. Exits 1 when a check fails.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio_client is imported (through load)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections import deque  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from common import PROMPTS, machine, percentile  # noqa: E402
from gradio_client import Client  # noqa: E402
from load import UserStats, free_port, notice_of, respond_once, vote_once  # noqa: E402

from rlhf_chat.config import AppConfig, ModelConfig, apply_overrides  # noqa: E402
from rlhf_chat.storage import store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 600.0  # the bundled model's first conversion takes a minute; a hang is a failure
# What a simulated person does after two answers, besides voting (shares of turns):
REGENERATE_SHARE = 0.1  # asks for two new answers first
WRITE_SHARE = 0.05  # writes an answer instead of voting
CONTINUE_SHARE = 0.3  # after a vote, presses Continue (refused, and not counted, unless the answer was cut off)
TURNS = 4  # messages per conversation before a new one, as in bench/load.py
NO_CONTINUE = "There is no cut-off answer to continue."
# A window's memory peak: read this often. One reading at a window's end lands
# between jobs or in the middle of one, by chance, and moved by a few hundred MB.
MEMORY_EVERY_S = 2.0


# --- the app under test ------------------------------------------------------------------------


def start_app(out: Path, work: Path, model: str | None, settings: list[str]) -> tuple[subprocess.Popen, int]:
    """``python app.py --port P`` with its own database and checkpoint folder under ``work``."""
    port = free_port()
    env = {**os.environ, "RLHF_CHAT_DB": f"sqlite:///{work / 'feedback.db'}",
           "RLHF_CHAT_CHECKPOINTS": str(work / "checkpoints"), "RLHF_CHAT_ADMIN_PASSWORD": "",
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "app.py", "--port", str(port)] + (["--model", model] if model else [])
    for setting in settings:
        args += ["--set", setting]
    with open(out / "app.log", "ab") as log:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, port


def wait_healthy(process: subprocess.Popen, port: int, timeout_s: float = START_TIMEOUT_S) -> float:
    """Seconds until ``GET /health`` says ok; raises if the app exits or never does."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode} (see app.log)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if json.loads(response.read()).get("status") == "ok":
                    return time.monotonic() - start
        except (OSError, ValueError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the app was not healthy within {timeout_s:.0f} s (see app.log)")


def stop_app(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def resident_mb(pid: int) -> float:
    """Resident memory (VmRSS) of ``pid`` and all its descendants, in MB (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended meanwhile
            children.setdefault(ppid, []).append(int(entry.name))
    total_kb, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            pass
    return total_kb / 1024


def size_mb(*paths: Path) -> float:
    """The size of files and folders (recursively), in MB; missing ones count 0."""
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total / 2**20


# --- the people ----------------------------------------------------------------------------------


@dataclass
class Person:
    """One simulated person's counts beside ``load.UserStats`` (which has the latencies and votes)."""

    stats: UserStats = field(default_factory=UserStats)
    answered: list[tuple[float, float]] = field(default_factory=list)  # (monotonic time done, seconds to two answers)
    written: int = 0  # written answers acknowledged
    regenerated: int = 0
    continued: int = 0
    generations: deque = field(default_factory=deque)  # times of this person's recent requests for answers


def pace(person: Person, per_minute: int) -> None:
    """Wait until one more request for answers stays within ``ui.generations_per_minute``,
    as a person reading the answers would; the limit itself is tested elsewhere."""
    now = time.monotonic()
    while person.generations and now - person.generations[0] >= 60.0:
        person.generations.popleft()
    if person.generations and len(person.generations) >= max(1, per_minute - 1):
        time.sleep(max(0.0, 60.0 - (now - person.generations[0])) + 0.5)
    person.generations.append(time.monotonic())


def ask(client: Client, person: Person, index: int, message: str, per_minute: int) -> bool:
    """Send ``message`` (retrying past the limits); True with two answers on screen."""
    for _ in range(10):
        pace(person, per_minute)
        before = (len(person.stats.respond_s), person.stats.rate_limited, person.stats.db_busy)
        if respond_once(client, message, index, person.stats):
            person.answered.append((time.monotonic(), person.stats.respond_s[-1]))
            return True
        if (person.stats.rate_limited, person.stats.db_busy) == before[1:]:
            return False  # an error (counted by respond_once), not a refusal to wait out
        time.sleep(2.0)
    return False


def regenerate(client: Client, person: Person, index: int, per_minute: int) -> bool:
    """Regenerate; True with two new answers on screen."""
    pace(person, per_minute)
    start = time.perf_counter()
    try:
        notice = notice_of(client.predict(api_name="/regenerate"))
    except Exception as exc:
        person.stats.errors.append(f"user {index}: regenerate: {type(exc).__name__}: {exc}")
        return False
    if "Which answer is better?" not in notice:
        person.stats.errors.append(f"user {index}: regenerate refused: {notice!r}")
        return False
    person.answered.append((time.monotonic(), time.perf_counter() - start))
    person.regenerated += 1
    return True


def write_answer(client: Client, person: Person, index: int) -> bool:
    """Edit answer A into one's own and submit it; True when acknowledged."""
    try:
        text, started = client.predict(api_name="/start_from_a")
        output = client.predict(f"{text}\n\nIn short: it depends on what you need.", started, api_name="/submit_answer")
    except Exception as exc:
        person.stats.errors.append(f"user {index}: write: {type(exc).__name__}: {exc}")
        return False
    if notice_of(output).startswith("Recorded"):
        person.written += 1
        return True
    person.stats.errors.append(f"user {index}: written answer refused: {notice_of(output)!r}")
    return False


def press_continue(client: Client, person: Person, index: int, per_minute: int) -> None:
    """Continue the chosen answer; a refusal because it was not cut off is no error."""
    pace(person, per_minute)
    try:
        notice = notice_of(client.predict(api_name="/continue"))
    except Exception as exc:
        person.stats.errors.append(f"user {index}: continue: {type(exc).__name__}: {exc}")
        return
    if notice.startswith(("Done.", "Cut off again")):
        person.continued += 1
    elif notice != NO_CONTINUE:
        person.stats.errors.append(f"user {index}: continue refused: {notice!r}")


def one_turn(client: Client, person: Person, index: int, turn: int, rng: random.Random, per_minute: int) -> None:
    """A message and what follows it: perhaps Regenerate, then a vote (perhaps Continue) or a written answer."""
    if turn and turn % TURNS == 0:
        client.predict(api_name="/new_conversation")
    if not ask(client, person, index, PROMPTS[(index + turn) % len(PROMPTS)], per_minute):
        client.predict(api_name="/new_conversation")  # back to a known state
        return
    if rng.random() < REGENERATE_SHARE and not regenerate(client, person, index, per_minute):
        client.predict(api_name="/new_conversation")
        return
    if rng.random() < WRITE_SHARE:
        if not write_answer(client, person, index):
            client.predict(api_name="/new_conversation")
        return
    if not vote_once(client, index, person.stats):
        client.predict(api_name="/new_conversation")
    elif rng.random() < CONTINUE_SHARE:
        press_continue(client, person, index, per_minute)


def live(url: str, index: int, deadline: float, person: Person, per_minute: int) -> None:
    """One simulated person, turn after turn until the deadline (the last turn ends past it)."""
    rng = random.Random(index)
    try:
        client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    except Exception as exc:
        person.stats.errors.append(f"user {index}: connect: {type(exc).__name__}: {exc}")
        return
    try:
        turn = 0
        while time.monotonic() < deadline:
            one_turn(client, person, index, turn, rng, per_minute)
            turn += 1
    except Exception as exc:  # even the recovery failed: this person stops
        person.stats.errors.append(f"user {index}: {type(exc).__name__}: {exc}")
    finally:
        client.close()


# --- every window ------------------------------------------------------------------------------


def health(port: int) -> dict:
    """The app's ``GET /health`` body ({} when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return {}


class MemoryPeaks(threading.Thread):
    """Reads the resident memory of ``pid`` and its descendants every ``every_s``
    seconds; :meth:`take` returns the highest reading since the last take."""

    def __init__(self, pid: int, every_s: float = MEMORY_EVERY_S):
        super().__init__(name="memory-peaks", daemon=True)
        self.pid, self.every_s, self.peak = pid, every_s, 0.0
        self.stopped = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            reading = resident_mb(self.pid)
            with self.lock:
                self.peak = max(self.peak, reading)

    def take(self, now_mb: float) -> float:
        """The window's peak (at least ``now_mb``, the reading at its end), and start the next window."""
        with self.lock:
            peak, self.peak = max(self.peak, now_mb), 0.0
        return peak


def stored_counts(sessions) -> tuple[int, int]:
    """(votes, written answers) in the database."""
    with sessions() as session:
        return store.count_votes(session), store.count_demonstrations(session)


def window_row(app: subprocess.Popen, port: int, work: Path, sessions, people: list[Person],
               start: float, since: float, peaks: MemoryPeaks) -> dict:
    """One row of the table: the process's memory, the window's latency, disk, and the counts so far."""
    now = time.monotonic()
    rss = resident_mb(app.pid)
    waits = [s for p in people for done, s in list(p.answered) if since < done <= now]
    votes, written = stored_counts(sessions)
    status = health(port)
    return {
        "minute": round((now - start) / 60, 2),
        "rss_mb": round(rss, 1),
        "rss_peak_mb": round(peaks.take(rss), 1),
        "answers": len(waits),
        "p50_s": round(percentile(waits, 0.5), 2) if waits else None,
        "p95_s": round(percentile(waits, 0.95), 2) if waits else None,
        "db_mb": round(size_mb(*(work / f"feedback.db{suffix}" for suffix in ("", "-wal", "-shm", "-journal"))), 2),
        "checkpoints_mb": round(size_mb(work / "checkpoints"), 2),
        "errors": sum(len(p.stats.errors) for p in people),
        "votes_acknowledged": sum(p.stats.acknowledged for p in people),
        "votes_stored": votes,
        "written_acknowledged": sum(p.written for p in people),
        "written_stored": written,
        "policy_version": status.get("policy_version"),
        "reward_version": status.get("reward_version"),
    }


def watch(app, port, work, sessions, people, threads, start, window_s) -> list[dict]:
    """A row every ``window_s`` until every person has finished, then a last one."""
    rows, since = [], start
    peaks = MemoryPeaks(app.pid)
    peaks.start()
    try:
        while any(t.is_alive() for t in threads):
            next_at = since + window_s
            while time.monotonic() < next_at and any(t.is_alive() for t in threads):
                time.sleep(min(1.0, max(0.0, next_at - time.monotonic())))
            rows.append(window_row(app, port, work, sessions, people, start, since, peaks))
            since = time.monotonic()
            print(table_line(rows[-1]), flush=True)
    finally:
        peaks.stopped.set()
    return rows


# --- the report ----------------------------------------------------------------------------------

COLUMNS = ("minute", "rss_mb", "rss_peak_mb", "answers", "p50_s", "p95_s", "db_mb", "checkpoints_mb", "errors",
           "votes_acknowledged", "votes_stored", "written_acknowledged", "written_stored",
           "policy_version", "reward_version")


def table_line(row: dict) -> str:
    """A Markdown table row of :data:`COLUMNS`."""
    return "| " + " | ".join("-" if row[c] is None else str(row[c]) for c in COLUMNS) + " |"


def write_plot(rows: list[dict], path: Path) -> bool:
    """Memory, latency and disk against minutes, one panel each (matplotlib, if installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False  # the JSON and CSV carry the same figures
    minutes = [r["minute"] for r in rows]
    fig, (mem, lat, disk) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    mem.plot(minutes, [r["rss_peak_mb"] / 1024 for r in rows], marker="o", label="peak in the window")
    mem.plot(minutes, [r["rss_mb"] / 1024 for r in rows], marker=".", label="at the window's end")
    mem.set_ylabel("resident memory (GB)")
    mem.legend()
    for key, label in (("p50_s", "median"), ("p95_s", "p95")):
        lat.plot(minutes, [r[key] for r in rows], marker="o", label=label)
    lat.set_ylabel("two answers (s)")
    lat.legend()
    for key, label in (("db_mb", "database"), ("checkpoints_mb", "checkpoints")):
        disk.plot(minutes, [r[key] for r in rows], marker="o", label=label)
    disk.set_ylabel("disk (MB)")
    disk.set_xlabel("minutes")
    disk.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def checks_of(rows: list[dict], people: list[Person], final: tuple[int, int]) -> dict[str, bool]:
    """What must hold after a soak: nothing errored, every acknowledged vote and written answer stored."""
    votes, written = final
    return {
        "no errors": sum(len(p.stats.errors) for p in people) == 0,
        "stored votes == acknowledged": votes == sum(p.stats.acknowledged for p in people),
        "stored written answers == acknowledged": written == sum(p.written for p in people),
        "at least one window": bool(rows),
    }


def report(out: Path, rows: list[dict], people: list[Person], summary: dict) -> None:
    """Write ``soak.json``, ``soak.csv`` and ``soak.png``; print the checks and the first errors."""
    with open(out / "soak.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    summary["plot"] = "soak.png" if write_plot(rows, out / "soak.png") else None
    (out / "soak.json").write_text(json.dumps({**summary, "windows": rows}, indent=2))
    for name, ok in summary["checks"].items():
        print(f"check {name}: {'ok' if ok else 'FAILED'}")
    errors = [e for p in people for e in p.stats.errors]
    for error in errors[:10]:
        print(f"error: {error}")
    print(f"wrote {out / 'soak.json'}, soak.csv" + (", soak.png" if summary["plot"] else " (no matplotlib: no plot)"))


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=8, help="simulated people at once (default 8)")
    parser.add_argument("--minutes", type=float, default=60.0, help="how long they keep going (default 60)")
    parser.add_argument("--window-minutes", type=float, default=5.0, help="minutes between records (default 5)")
    parser.add_argument("--out", default="bench/out/soak", help="folder for soak.json, .csv, .png, app.log")
    parser.add_argument("--model", default=None, help="the app's --model (default: the bundled model)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead (a quick smoke run)")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE",
                        help="a setting for the app, as its own --set (repeatable)")
    return parser.parse_args(argv)


def app_settings(args: argparse.Namespace) -> tuple[list[str], AppConfig]:
    """The app's --set list and the config it amounts to. Every person comes from 127.0.0.1,
    one address, so the address limit (ui.people_per_address) is raised to the people."""
    settings = [f"ui.people_per_address={max(AppConfig().ui.people_per_address, args.people)}", *args.set]
    return settings, apply_overrides(AppConfig(), settings)


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 when every check holds."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rlhf-chat-soak-"))
    model = args.model
    if args.tiny:
        from rlhf_chat.model.loading import prepare_bundled_model, write_tiny_model

        model = str(write_tiny_model(work / "tiny-model", str(prepare_bundled_model(ModelConfig().cache_dir))))
    settings, cfg = app_settings(args)
    app, port = start_app(out, work, model, settings)
    try:
        started_s = wait_healthy(app, port)
        print(f"machine: {machine()}\napp: pid {app.pid}, healthy in {started_s:.1f} s, model {model or 'bundled'}, "
              f"settings {settings}\n{args.people} people for {args.minutes:g} min, a row every "
              f"{args.window_minutes:g} min\n| " + " | ".join(COLUMNS) + " |", flush=True)
        sessions = store.open_store(f"sqlite:///{work / 'feedback.db'}")
        people = [Person() for _ in range(args.people)]
        start = time.monotonic()
        deadline = start + args.minutes * 60
        per_minute = cfg.ui.generations_per_minute
        threads = [threading.Thread(target=live, args=(f"http://127.0.0.1:{port}/", i, deadline, people[i], per_minute),
                                    name=f"person-{i}") for i in range(args.people)]
        for t in threads:
            t.start()
        rows = watch(app, port, work, sessions, people, threads, start, args.window_minutes * 60)
    finally:
        stop_app(app)
    final = stored_counts(sessions)  # after the app stopped: nothing is still being written
    summary = {
        "machine": machine(), "people": args.people, "minutes": args.minutes, "model": model or "bundled",
        "settings": settings, "startup_s": round(started_s, 1), "final_stored": {"votes": final[0], "written": final[1]},
        "regenerated": sum(p.regenerated for p in people), "continued": sum(p.continued for p in people),
        "rate_limited": sum(p.stats.rate_limited for p in people), "db_busy": sum(p.stats.db_busy for p in people),
        "errors": [e for p in people for e in p.stats.errors][:50],
        "checks": checks_of(rows, people, final),
    }
    report(out, rows, people, summary)
    return 0 if all(summary["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
