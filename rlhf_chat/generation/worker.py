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
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

from rlhf_chat.config import ModelConfig
from rlhf_chat.model.loading import Models
from rlhf_chat.model.memory import MemoryTrimmer

log = logging.getLogger(__name__)
T = TypeVar("T")

CHAT, REWARD, PPO = 0, 1, 2  # lower runs first
_STOP = object()
_current = threading.local()  # the worker and the priority of the job running on this thread


def yield_point() -> None:
    """Inside a worker job: run more urgent waiting jobs now. Elsewhere: nothing."""
    worker = getattr(_current, "worker", None)
    if worker is not None:
        worker.run_urgent()


class ModelWorker:
    """Runs ``fn(models)`` jobs one at a time, most urgent first, on its own thread."""

    def __init__(self, load: Callable[[], Models], trim_every_s: float | None = None):
        self._load = load
        # Freed memory goes back to the system from this thread, which allocates the
        # tensors (model/memory.py); ``model.trim_memory_every_s`` unless told otherwise.
        every = ModelConfig().trim_memory_every_s if trim_every_s is None else trim_every_s
        self.trimmer = MemoryTrimmer(every)
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # FIFO among equal priorities
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.serving_version = 0  # read by any thread; written only by the worker thread
        self._models = None

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
        _current.worker, _current.priority = self, None
        self.ready.set()
        while True:
            priority, order, fn, future = self._jobs.get()
            if fn is _STOP:
                return
            self._execute(priority, fn, future)
            if self._jobs.empty():  # between jobs, so that nobody waits behind a trim
                self.trimmer.maybe_trim()

    def _execute(self, priority: int, fn: Callable, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        if self._models is None:
            future.set_exception(RuntimeError(f"the model failed to load: {self.load_error}"))
            return
        outer, _current.priority = _current.priority, priority
        try:
            future.set_result(fn(self._models))
        except BaseException as exc:
            future.set_exception(exc)
        finally:
            _current.priority = outer
            self.serving_version = self._models.serving_version

    def run_urgent(self) -> int:
        """Run, nested, every waiting job more urgent than the one under way; returns how many."""
        current = _current.priority
        if current is None or current <= CHAT:
            return 0  # not inside a job, or already the most urgent kind
        ran = 0
        while True:
            with self._jobs.mutex:
                head = self._jobs.queue[0] if self._jobs.queue else None
                if head is None or head[2] is _STOP or head[0] >= current:
                    return ran
            priority, _, fn, future = self._jobs.get_nowait()
            self._execute(priority, fn, future)
            ran += 1
