"""Worker: the one thread that owns the models.

Switching adapters is global state on a model, so nothing else touches the
models: UI handlers and trainers hand the worker small jobs and wait on a
future. Jobs run by priority (a person waiting first, then reward training,
then PPO), so a person waits at most for the one training slice under way.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

from rlhf_chat.loading import Models

log = logging.getLogger(__name__)
T = TypeVar("T")

CHAT, REWARD, PPO = 0, 1, 2  # lower runs first
_STOP = object()


class ModelWorker:
    """Runs ``fn(models)`` jobs one at a time, most urgent first, on its own thread."""

    def __init__(self, load: Callable[[], Models]):
        self._load = load
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # FIFO among equal priorities
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.serving_version = 0  # read by any thread; written only by the worker thread

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
        self.serving_version = getattr(models, "serving_version", 0)
        self.ready.set()
        while True:
            _, _, fn, future = self._jobs.get()
            if fn is _STOP:
                return
            if not future.set_running_or_notify_cancel():
                continue
            if models is None:
                future.set_exception(RuntimeError(f"the model failed to load: {self.load_error}"))
                continue
            try:
                future.set_result(fn(models))
            except BaseException as exc:
                future.set_exception(exc)
            self.serving_version = models.serving_version
