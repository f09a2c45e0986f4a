"""Progress events and cancellation shared by every long job (merge, analysis, export, push).

A job calls `report(...)` with what it has done; the CLI draws a bar from it and
the GUI forwards it through a Qt signal. A `CancelToken` is checked between
tensors, so a Cancel takes effect within one tensor's work.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import MergeCancelled


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # e.g. "prepare", "merge", "write", "analyze", "upload"
    done: int  # items (tensors) done
    total: int
    bytes_done: int = 0
    bytes_total: int = 0
    elapsed_s: float = 0.0
    message: str = ""

    @property
    def fraction(self) -> float:
        if self.bytes_total > 0:
            return min(1.0, self.bytes_done / self.bytes_total)
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left, from the rate so far; None until there is a rate."""
        frac = self.fraction
        if frac <= 0.0 or self.elapsed_s <= 0.0:
            return None
        return self.elapsed_s * (1.0 - frac) / frac


ProgressCallback = Callable[[ProgressEvent], None]


class CancelToken:
    """Thread-safe flag a UI sets and a worker polls."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise MergeCancelled()


@dataclass
class ProgressTracker:
    """Counts work done and emits events; the rate (and so the ETA) is from its start."""

    stage: str
    total: int
    bytes_total: int = 0
    callback: ProgressCallback | None = None
    cancel: CancelToken | None = None
    done: int = 0
    bytes_done: int = 0
    started: float = field(default_factory=time.perf_counter)

    def step(self, nbytes: int = 0, message: str = "", count: int = 1) -> None:
        self.done += count
        self.bytes_done += nbytes
        self.emit(message)
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()

    def emit(self, message: str = "") -> None:
        if self.callback is not None:
            self.callback(
                ProgressEvent(self.stage, self.done, self.total, self.bytes_done, self.bytes_total, time.perf_counter() - self.started, message)
            )
