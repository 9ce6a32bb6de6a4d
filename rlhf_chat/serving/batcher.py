"""Batcher: the pairs several people are waiting for, written in one batched call.

Decoding on a CPU is limited by reading the weights, not by arithmetic, so a
call that writes 16 rows costs far less than 8 calls of 2 rows (the README's
load figures). Each person's request waits in a list; one chat job on the
model worker takes every request waiting when it starts (up to
``max_people``), writes all their pairs in one ``generate_pairs`` call, and
streams each person's two rows to that person. Requests that arrive while a
batch is being written go in the next one, queued right behind it, so chat
keeps its priority over training exactly as one job per person had it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from rlhf_chat.generation.candidates import Candidate, PairModes, Sampling, generate_pairs
from rlhf_chat.generation.worker import CHAT, ModelWorker

log = logging.getLogger(__name__)

EXPECT_WAIT_S = 0.5  # the longest a batch waits for more people before it starts

# The context a pair answers and its rendered prompt, built on the worker
# with the model's tokenizer (a person's history is trimmed to the budget there).
PromptBuilder = Callable[[object], tuple[list[dict], list[int]]]
PairResult = tuple[list[dict], Candidate, Candidate]


@dataclass
class PairRequest:
    """One person's pair: how to build its prompt, its kind, and where its text goes."""

    build: PromptBuilder
    arena: bool = False
    modes: PairModes | None = None
    on_update: Callable[[list[str]], None] | None = None
    future: Future | None = None


class BatcherFull(Exception):
    """More people are waiting than ``max_waiting``: come back in a minute."""


class PairBatcher:
    """Gathers people's pair requests into batched sampling calls on the model worker."""

    def __init__(
        self, worker: ModelWorker, sampling_config, max_people: int = 8, wait_s: float = 0.0, max_waiting: int = 64
    ):
        if max_people < 1:
            raise ValueError(f"ui.batch_people {max_people}: at least 1")
        self.max_waiting = max_waiting
        self.worker = worker
        self.sampling_config = sampling_config
        self.max_people = max_people
        self.wait_s = wait_s
        self._pending: list[PairRequest] = []
        self._lock = threading.Lock()
        self._scheduled = False  # a batch job is queued or running and will look at _pending
        self._expected = 0  # pairs announced by expect() and not yet submitted
        self._last_arrival = 0.0  # when the newest pair was submitted (monotonic)
        self.running = 0  # people in the batch being written now (the UI paces its updates by it)
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # people per call, newest last (benchmark, tests)

    def submit(self, request: PairRequest, expected: bool = False) -> Future[PairResult]:
        """Queue a person's pair; the future holds (context, candidate A, candidate B).

        Raises :class:`BatcherFull` when ``max_waiting`` people already wait.
        ``expected``: this pair was announced with :meth:`expect`.

        Cancelling the future before its batch starts takes the request out (a
        browser that went away costs no decoding).
        """
        request.future = Future()
        with self._lock:
            self._expected = max(0, self._expected - 1) if expected else self._expected
            if len(self._pending) >= self.max_waiting:
                raise BatcherFull(f"{len(self._pending)} people are waiting")
            self._pending.append(request)
            self._last_arrival = time.monotonic()
            schedule, self._scheduled = not self._scheduled, True
        if schedule:
            self._schedule()
        return request.future

    def _schedule(self) -> None:
        """Queue a batch job; if the worker cannot run it at all (the model failed
        to load), everyone waiting hears why instead of waiting for ever."""
        self.worker.submit(CHAT, self._run_batch).add_done_callback(self._job_done)

    def _job_done(self, job: Future) -> None:
        if job.cancelled() or job.exception() is None:
            return
        with self._lock:
            stranded, self._pending, self._scheduled = self._pending, [], False
        for request in stranded:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(job.exception())

    def waiting(self) -> int:
        """People whose pair has not started yet."""
        with self._lock:
            return len(self._pending)

    def _take_batch(self) -> list[PairRequest]:
        """The next batch's requests (cancelled ones dropped); schedules one more batch
        job when requests are left over."""
        with self._lock:
            batch, self._pending = self._pending[: self.max_people], self._pending[self.max_people:]
            more = bool(self._pending)
            self._scheduled = more
        if more:
            self._schedule()
        return [r for r in batch if r.future.set_running_or_notify_cancel()]

    def expect(self) -> None:
        """A person's pair is on its way (their message is being stored): a batch
        about to start waits for it, up to ``EXPECT_WAIT_S``. Each call is matched
        by a :meth:`submit` or an :meth:`unexpect`."""
        with self._lock:
            self._expected += 1

    def unexpect(self) -> None:
        """An expected pair will not come (refused, or the browser went away)."""
        with self._lock:
            self._expected = max(0, self._expected - 1)

    def _gather(self) -> None:
        """Before a batch starts, while it has room: wait until no pair has arrived
        for ``wait_s`` and none is on its way, at most ``EXPECT_WAIT_S`` in all.

        People who press Enter at the same moment arrive a few tens of
        milliseconds apart; each arrival extends the wait, so they share one
        call, while a lone person waits ``wait_s`` once.
        """
        longest = time.monotonic() + EXPECT_WAIT_S
        while True:
            with self._lock:
                room = len(self._pending) < self.max_people
                quiet = time.monotonic() - self._last_arrival >= self.wait_s
                expected = self._expected > 0
            if not room or time.monotonic() >= longest or (quiet and not expected):
                return
            time.sleep(0.01)

    def _run_batch(self, models) -> None:
        self._gather()
        batch, built = [], []
        for request in self._take_batch():
            try:  # one person's bad context fails that person's pair only
                built.append(request.build(models.tokenizer))
                batch.append(request)
            except BaseException as exc:
                log.exception("building a pair's prompt failed")
                request.future.set_exception(exc)
        if not batch:
            return
        self.running = len(batch)
        try:
            sampling = Sampling.from_config(self.sampling_config, secrets.randbelow(2**31))
            pairs = generate_pairs(
                models.serving, models.tokenizer, [prompt for _, prompt in built], sampling, models.serving_version,
                [r.arena for r in batch], [r.modes for r in batch], [r.on_update for r in batch],
            )
        except BaseException as exc:  # everyone in the call hears of it; the worker goes on
            log.exception("writing a batch of %d pairs failed", len(batch))
            for request in batch:
                request.future.set_exception(exc)
            return
        finally:
            self.running = 0
        self.batch_sizes.append(len(batch))
        for request, (context, _), (a, b) in zip(batch, built, pairs):
            request.future.set_result((context, a, b))
