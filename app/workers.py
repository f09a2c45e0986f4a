"""Background jobs: run an engine call off the GUI thread, report progress, honour Cancel.

A `Job` wraps a function `fn(progress, cancel) -> result`. It runs on a thread
pool; its signals arrive on the GUI thread (queued), so slots may touch
widgets. Exactly one of `succeeded`, `failed` or `cancelled` is emitted, then
`finished`. Errors the user can cause (`AlloyError`) become their message;
anything else becomes a one-line message and a log record, never a traceback
in the window.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from PySide6.QtCore import QObject, QRunnable, QThreadPool, QTimer, Signal

from merging.progress import CancelToken

log = logging.getLogger("alloy.app")

JobFn = Callable[[Callable[[Any], None], CancelToken], Any]

_POOL: QThreadPool | None = None
_LIVE: set["Job"] = set()  # started jobs, kept alive until their last signal is delivered


def job_pool() -> QThreadPool:
    """A pool of our own, so a long merge never starves previews and file inspection."""
    global _POOL
    if _POOL is None:
        _POOL = QThreadPool()
        _POOL.setMaxThreadCount(4)
    return _POOL


class _Runner(QRunnable):
    def __init__(self, job: "Job"):
        super().__init__()
        self.job = job
        self.setAutoDelete(True)

    def run(self) -> None:  # worker thread
        self.job._run()


class Job(QObject):
    progress = Signal(object)
    succeeded = Signal(object)
    failed = Signal(str)
    cancelled = Signal()
    finished = Signal()

    def __init__(self, fn: JobFn, *, name: str = "job", throttle_s: float = 0.05):
        # No Qt parent: a job must outlive the widget that started it until its worker returns.
        super().__init__()
        self.fn = fn
        self.name = name
        self.throttle_s = throttle_s
        self.token = CancelToken()
        self.result: Any = None
        self.error: str | None = None
        self._last_emit = 0.0
        self._pending: Any = None
        self._last_stage: Any = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._started = False

    # -- GUI thread -------------------------------------------------------------------
    def start(self, pool: QThreadPool | None = None) -> "Job":
        if self._started:
            raise RuntimeError(f"{self.name} was already started")
        self._started = True
        _LIVE.add(self)
        # An event held back by the throttle is delivered by this timer, so the bar never lags by a slow tensor.
        self._flush_timer = QTimer(self)
        self._flush_timer.setInterval(max(20, int(self.throttle_s * 1000)))
        self._flush_timer.timeout.connect(self._flush_pending)
        self._flush_timer.start()
        self.finished.connect(self._forget)  # queued: runs on the GUI thread after the other signals
        (pool or job_pool()).start(_Runner(self))
        return self

    def cancel(self) -> None:
        self.token.cancel()

    @property
    def is_cancelled(self) -> bool:
        return self.token.is_set()

    @property
    def running(self) -> bool:
        return self._started and not self._done.is_set()

    def _flush_pending(self) -> None:  # GUI thread
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None:
                self._last_emit = time.monotonic()
        if pending is not None and not self._done.is_set():
            self.progress.emit(pending)

    def _forget(self) -> None:
        self._flush_timer.stop()
        _LIVE.discard(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the function returned (tests and shutdown only)."""
        return self._done.wait(timeout)

    # -- worker thread ----------------------------------------------------------------
    def report(self, event: Any) -> None:
        """Progress callback handed to the engine; throttled so the GUI gets ~20 updates/s at most."""
        now = time.monotonic()
        stage = getattr(event, "stage", None)
        with self._lock:
            if now - self._last_emit < self.throttle_s and not _is_final(event) and stage == self._last_stage:
                self._pending = event
                return
            self._last_emit = now
            self._last_stage = stage
            self._pending = None
        self.progress.emit(event)

    def _run(self) -> None:
        from merging.errors import AlloyError, MergeCancelled

        try:
            result = self.fn(self.report, self.token)
        except MergeCancelled:
            self._finish(cancelled=True)
            return
        except AlloyError as exc:
            if self.token.is_set():
                self._finish(cancelled=True)
                return
            self.error = str(exc)
            self._finish(error=self.error)
            return
        except MemoryError:
            self.error = "out of memory; close other programs or merge on a machine with more RAM"
            self._finish(error=self.error)
            return
        except Exception as exc:  # noqa: BLE001 - a worker must never die silently
            log.exception("%s failed", self.name)
            if self.token.is_set():
                self._finish(cancelled=True)
                return
            self.error = f"unexpected error in {self.name}: {type(exc).__name__}: {exc}"
            self._finish(error=self.error)
            return
        if self.token.is_set():
            self._finish(cancelled=True)
            return
        self.result = result
        self._finish(result=result, ok=True)

    def _finish(self, *, result: Any = None, error: str | None = None, cancelled: bool = False, ok: bool = False) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and not cancelled:
            self.progress.emit(pending)
        self._done.set()
        if cancelled:
            self.cancelled.emit()
        elif ok:
            self.succeeded.emit(result)
        else:
            self.failed.emit(error or "failed")
        self.finished.emit()


def _is_final(event: Any) -> bool:
    done, total = getattr(event, "done", None), getattr(event, "total", None)
    return done is not None and total is not None and done >= total


def live_jobs() -> list[Job]:
    return list(_LIVE)


def cancel_all(timeout_s: float = 30.0) -> bool:
    """Cancel every running job and wait for the workers to return (shutdown, tests)."""
    jobs = [j for j in _LIVE if j.running]
    for job in jobs:
        job.cancel()
    deadline = time.monotonic() + timeout_s
    return all(job.wait(max(0.0, deadline - time.monotonic())) for job in jobs)
