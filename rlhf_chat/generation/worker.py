"""Worker: the one thread that owns the models.

Switching adapters is global state on a model, so nothing else touches the
models: UI handlers and trainers hand the worker small jobs and wait on a
future. Jobs run by priority (a person waiting first, then reward training,
then PPO), so a person waits at most for the one training slice under way.

A long slice can do better: it calls :func:`yield_point` at safe places (each
decoding step of a PPO rollout), and the worker runs any more urgent job there
and then, nested, before the slice goes on. Safe because the more urgent job
only generates on the serving copy, whose weights change in PPO's publish job
alone, and that never runs nested inside a chat job.

Strict priority starves training under sustained chat: in a 20-minute soak with
8 people a chat job was always waiting, and no reward round ever ran (issue 42).
A demo that stops learning under load is not a live RLHF demo, so training
(reward and PPO jobs) is guaranteed ``model.training_share`` of the worker's
recent busy time while chat waits. The worker charges each job's time to its
class (a nested job's time to the nested job, not to the slice around it), with
older time decaying by half every :data:`SHARE_HALF_LIFE_S`. While training's
share is below its due it is *owed*: the worker picks a waiting training job
before waiting chat, and a slice's yield points give way to no chat job. Once
training has its share, chat comes first again. With no chat waiting, or with a
share of 0, nothing changes: strict priority as before.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, TypeVar

from rlhf_chat.config import ModelConfig
from rlhf_chat.model.loading import Models
from rlhf_chat.model.memory import MemoryTrimmer

log = logging.getLogger(__name__)
T = TypeVar("T")

CHAT, REWARD, PPO = 0, 1, 2  # lower runs first; above CHAT is training
# "Recent" for training's share: long beside one job (a chat turn or a training
# step takes seconds), so the share averages over many jobs, yet short enough
# that an hour of chat alone does not bank a long burst of training. The longest
# burst owed after chat alone is -ln(1 - share) * half-life / ln 2: 25 s at a
# share of 0.25, during which a person waits.
SHARE_HALF_LIFE_S = 60.0
# While training is owed its share, after a training job the worker waits this long
# for the training loop's next one before it takes a waiting person's. The loop
# submits its slices one at a time (a reward step, a PPO phase) with a little work
# between; without the wait a chat job (seconds long) slipped in between every two
# slices, and a reward round under 8 people's load took over 12 minutes.
TRAINING_GRACE_S = 0.1
_STOP = object()
_current = threading.local()  # the worker whose thread this is (yield_point elsewhere does nothing)


def yield_point() -> None:
    """Inside a worker job: run more urgent waiting jobs now. Elsewhere: nothing."""
    worker = getattr(_current, "worker", None)
    if worker is not None:
        worker.run_urgent()


class ModelWorker:
    """Runs ``fn(models)`` jobs one at a time, most urgent first, on its own thread."""

    def __init__(
        self, load: Callable[[], Models], trim_every_s: float | None = None, training_share: float | None = None
    ):
        self._load = load
        defaults = ModelConfig()  # the settings not given: model.trim_memory_every_s, model.training_share
        # Freed memory goes back to the system from this thread, which allocates the
        # tensors (model/memory.py).
        self.trimmer = MemoryTrimmer(defaults.trim_memory_every_s if trim_every_s is None else trim_every_s)
        self.training_share = defaults.training_share if training_share is None else training_share
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # FIFO among equal priorities
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.serving_version = 0  # read by any thread; written only by the worker thread
        self._models = None
        # Busy seconds of chat and of training, decayed (SHARE_HALF_LIFE_S); written
        # only by the worker thread, through _charge.
        self._chat_s = self._training_s = 0.0
        self._running: list[int] = []  # priorities of the jobs under way, the nested one last
        self._mark = time.monotonic()  # when time was last charged
        self._last_priority = CHAT  # of the last job run at the top level

    def start(self) -> ModelWorker:
        """Load the models and start taking jobs (returns at once)."""
        self._thread.start()
        return self

    def submit(self, priority: int, fn: Callable[[Models], T]) -> Future[T]:
        """Queue a job; its future holds the result or the exception."""
        future: Future[T] = Future()
        self._jobs.put((priority, next(self._order), fn, future))
        return future

    def call(self, priority: int, fn: Callable[[Models], T], timeout: float | None = None) -> T:
        """Queue a job and wait for its result."""
        return self.submit(priority, fn).result(timeout)

    def pending(self, priority: int | None = None) -> int:
        """Jobs waiting (of one priority, or all); an estimate, for the UI and tests."""
        with self._jobs.mutex:
            return sum(1 for job in self._jobs.queue if priority is None or job[0] == priority)

    def recent_busy_s(self) -> tuple[float, float]:
        """Decayed busy seconds of (chat, training) as of the last job start, end or choice; for the UI and tests."""
        return self._chat_s, self._training_s

    def stop(self, timeout: float | None = 10.0) -> None:
        """Finish the job under way, then stop."""
        self._jobs.put((-1, -1, _STOP, None))
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            models = self._load()
        except BaseException as exc:  # the UI shows it; jobs fail with it
            log.exception("loading the models failed")
            self.load_error = exc
            models = None
        self._models = models
        self.serving_version = getattr(models, "serving_version", 0)
        _current.worker = self
        self.ready.set()
        while True:
            job = self._jobs.get()
            if job[2] is _STOP:
                return
            if job[0] <= CHAT and self._training_owed():
                job = self._prefer_training(job)
            self._execute(job[0], job[2], job[3])
            self._last_priority = job[0]
            self._between_jobs()

    def _between_jobs(self) -> None:
        """Give freed memory back, at most every ``trim_memory_every_s``, whether or not
        jobs wait: under sustained chat the queue is never empty, and a soak with
        training on grew 4.9 -> 5.9 GB in 5 minutes, while a trim after each reward
        round or PPO step held the same jobs near 2.1 GB. A trim takes milliseconds."""
        self.trimmer.maybe_trim()

    def _prefer_training(self, chat_job: tuple) -> tuple:
        """The most urgent waiting training job, the chat job put back; or the chat job if
        none waits, after a grace of :data:`TRAINING_GRACE_S` when a training job just ended."""
        training = self._take(CHAT + 1, math.inf)
        if training is None and self._last_priority > CHAT:
            deadline = time.monotonic() + TRAINING_GRACE_S
            while training is None and time.monotonic() < deadline:
                time.sleep(0.002)
                training = self._take(CHAT + 1, math.inf)
        if training is None:
            return chat_job
        self._jobs.put(chat_job)  # its (priority, order) keeps its place in the queue
        return training

    def _take(self, lowest: float, below: float) -> tuple | None:
        """Remove and return the most urgent waiting job with ``lowest <= priority < below``;
        None if there is none, or if the worker is told to stop (nothing more runs then)."""
        with self._jobs.mutex:
            jobs = self._jobs.queue  # a heap ordered by (priority, order)
            if not jobs or jobs[0][2] is _STOP:
                return None
            fitting = [job for job in jobs if lowest <= job[0] < below]
            if not fitting:
                return None
            job = min(fitting, key=lambda j: j[:2])
            jobs.remove(job)
            heapq.heapify(jobs)
            return job

    def _charge(self) -> None:
        """Charge the time since the last mark to the class of the job on top of the
        stack (a nested job's time is its own), after decaying the older time."""
        now = time.monotonic()
        elapsed, self._mark = now - self._mark, now
        keep = 0.5 ** (elapsed / SHARE_HALF_LIFE_S)
        self._chat_s *= keep
        self._training_s *= keep
        if self._running:
            # the elapsed time itself decayed as it went: its integral, about ``elapsed`` when short
            recent = (1 - keep) * SHARE_HALF_LIFE_S / math.log(2)
            if self._running[-1] > CHAT:
                self._training_s += recent
            else:
                self._chat_s += recent

    def _training_owed(self) -> bool:
        """Whether training has had less than ``training_share`` of the recent busy time."""
        self._charge()
        return self._training_s < self.training_share * (self._chat_s + self._training_s)

    def _execute(self, priority: int, fn: Callable, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        if self._models is None:
            future.set_exception(RuntimeError(f"the model failed to load: {self.load_error}"))
            return
        self._charge()  # the time until now belongs to the job that was on top
        self._running.append(priority)
        try:
            future.set_result(fn(self._models))
        except BaseException as exc:
            future.set_exception(exc)
        finally:
            self._charge()
            self._running.pop()
            self.serving_version = self._models.serving_version

    def run_urgent(self) -> int:
        """Run, nested, every waiting job more urgent than the one under way; returns how many.
        While training is owed its share, a training slice gives way to no chat job."""
        if threading.current_thread() is not self._thread or not self._running:
            return 0  # not inside a job (only the worker's own thread runs jobs)
        current = self._running[-1]
        if current <= CHAT:
            return 0  # already the most urgent kind
        ran = 0
        while True:
            job = self._take(CHAT + 1 if self._training_owed() else CHAT, current)
            if job is None:
                return ran
            self._execute(job[0], job[2], job[3])
            ran += 1
