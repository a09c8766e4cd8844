"""One model thread per engine, running the calls that wait for it together.

Calls are submitted from any thread or event loop. A diffusion stage batches continuously: the
model thread keeps one joint sampling run (`JointRun`) of up to `max_batch_size` calls, admits
waiting calls between its steps and hands each call its result the step it finishes, so a call
never waits for a whole run to end. Every step, the rows of all the calls in the run share
network evaluations at the engine's compute batch, whatever their step counts, samplers or
guidance. A call is admitted, in arrival order, while the run's rows per step (images times
guidance passes) still fit in one compute batch: more would only share the device between
calls, adding latency without saving work. A fresh run's first call waits up to
`batch_wait_s` for company. Other stages (the
encoder) take the waiting calls in groups of up to `max_batch_size` (`Engine.run_calls`).
A row's result does not depend on what it runs with, so batching changes throughput, not images.

The same batcher serves in-process calls, a stage service and a Ray Serve replica.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from unclip import metrics
from unclip.cancel import CancelToken
from unclip.errors import Cancelled, ResourceExhausted, Unavailable
from unclip.stage import Stage
from unclip.stages.compute import inline, on_compute_thread
from unclip.stages.engine import DiffusionEngine, Job, JointRun


@dataclass(frozen=True)
class BatchSettings:
    """How a stage batches. `compute_batch` is the engine's (rows per network evaluation: a
    row's result depends on it); the rest say how calls are grouped, which changes no image."""

    compute_batch: int = 1
    max_batch_size: int = 8  # calls per joint run
    batch_wait_s: float = 0.0  # how long the first call of a run waits for company
    max_pending: int = 32  # calls accepted and not finished; more is RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        if self.compute_batch < 1 or self.max_batch_size < 1 or self.max_pending < 1 or not self.batch_wait_s >= 0:
            raise ValueError(f"batch settings out of range: {self}")


def compute_batches(spec: str) -> dict[Stage, int]:
    """Each stage's compute batch from a flag: "8" for every stage, or "prior=16,decoder=4" for
    some (the others: 1). ValueError saying what is wrong otherwise."""

    def count(text: str) -> int:
        if not text.strip().isdigit() or int(text) < 1:
            raise ValueError(f"compute batch must be a positive integer, got {text!r}")
        return int(text)

    if "=" not in spec:
        return dict.fromkeys(Stage, count(spec))
    batches = dict.fromkeys(Stage, 1)
    for part in spec.split(","):
        name, _, value = part.partition("=")
        try:
            stage = Stage(name.strip())
        except ValueError:
            raise ValueError(f"unknown stage {name.strip()!r} in {spec!r}; stages: {[s.value for s in Stage]}") from None
        batches[stage] = count(value)
    return batches


@dataclass(eq=False)
class _Waiting:
    call: Any
    cancel: CancelToken
    progress: Any
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


_STOP = object()


RECORDED_RUNS = 10_000


class Batcher:
    """Runs `engine`'s calls on a thread of its own, grouped as `settings` say. `runs` holds,
    for the latest admissions, how many calls joined the engine's work together (stats, tests);
    `engine.stats` counts the network calls and rows they shared."""

    def __init__(self, engine: Any, settings: BatchSettings = BatchSettings()):
        self.engine = engine
        self.settings = settings
        self.runs: deque[int] = deque(maxlen=RECORDED_RUNS)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        on_gpu = getattr(engine, "device", None) is not None and engine.device.type != "cpu"
        self._compute = inline if on_gpu else on_compute_thread
        stage = getattr(engine, "STAGE", None)
        self._queue_depth = metrics.QUEUE_DEPTH.labels(stage.value if stage is not None else type(engine).__name__)
        self._thread = threading.Thread(target=self._work, name=f"{type(engine).__name__}-batcher", daemon=True)
        self._thread.start()

    async def submit(self, call: Any, cancel: CancelToken, progress: Any = None) -> Any:
        """The call's result. Cancelling the awaiting task cancels the call (between steps)."""
        future = self.enqueue(call, cancel, progress)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel.cancel()
            raise

    def enqueue(self, call: Any, cancel: CancelToken, progress: Any = None) -> concurrent.futures.Future:
        """Queue the call; the future holds its result or error."""
        with self._lock:
            if self._closed:
                raise Unavailable("the stage is shutting down")
            if self._pending >= self.settings.max_pending:
                raise ResourceExhausted(
                    f"{self._pending} requests are already queued (limit {self.settings.max_pending}); retry later"
                )
            self._pending += 1
            self._queue_depth.set(self._pending)
        waiting = _Waiting(call, cancel, progress)
        waiting.future.add_done_callback(self._done)
        self._queue.put(waiting)
        return waiting.future

    def _done(self, _: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending -= 1
            self._queue_depth.set(self._pending)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking calls; the calls already running finish, those still waiting fail with
        UNAVAILABLE. With a `timeout`, wait up to that long for the model thread to end."""
        with self._lock:
            self._closed = True
        self._queue.put(_STOP)
        if timeout is not None:
            self._thread.join(timeout)

    def _take(self, limit: int, wait_s: float, block: bool) -> list[_Waiting] | None:
        """Up to `limit` waiting calls: the first waited for if `block`, more that arrive within
        `wait_s` of it; None once the batcher is closed (nothing more is taken)."""
        batch: list[_Waiting] = []
        until = None
        while len(batch) < limit:
            if block and not batch:
                waiting = self._queue.get()
                until = time.monotonic() + wait_s
            else:
                remaining = 0.0 if until is None else until - time.monotonic()
                try:
                    waiting = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
            if waiting is _STOP:
                self._queue.put(_STOP)  # seen again by the drain below
                return batch or None
            batch.append(waiting)
        return batch

    @staticmethod
    def _live(batch: list[_Waiting]) -> list[_Waiting]:
        """The calls whose callers still want them, marked running; the others answered."""
        live = []
        for waiting in batch:
            if not waiting.future.set_running_or_notify_cancel():
                continue  # cancelled through its future while it waited
            if waiting.cancel.event.is_set():  # its caller left while it waited
                waiting.future.set_exception(Cancelled("the request was cancelled"))
            else:
                live.append(waiting)
        return live

    @staticmethod
    def _deliver(waiting: _Waiting, result: Any) -> None:
        if isinstance(result, BaseException):
            waiting.future.set_exception(result)
        else:
            waiting.future.set_result(result)

    def _work(self) -> None:
        if isinstance(self.engine, DiffusionEngine):
            self._work_continuously(self.engine)
        else:
            self._work_in_groups()
        self._drain()

    def _work_continuously(self, engine: DiffusionEngine) -> None:
        run = JointRun(engine)
        held: deque[tuple[Job, Any]] = deque()  # validated, waiting in arrival order for room in the run
        closed = False
        while True:
            if not closed and not held and len(run) < self.settings.max_batch_size:
                batch = self._take(self.settings.max_batch_size - len(run), self.settings.batch_wait_s, block=not run)
                closed = batch is None or self._closed
                for waiting in self._live(batch or []):
                    try:
                        job = self._compute(engine.job, waiting.call, waiting.cancel, waiting.progress)
                    except Exception as error:  # noqa: BLE001 - a call refused as it is validated fails alone
                        self._deliver(waiting, error)
                        continue
                    held.append((job, functools.partial(self._deliver, waiting)))
            joined = 0
            while held and (not run or run.rows + held[0][0].rows <= engine.compute_batch):
                run.add(*held.popleft())
                joined += 1
            if joined:
                self.runs.append(joined)
            if run:
                self._compute(run.step)
            elif closed and not held:
                return

    def _work_in_groups(self) -> None:
        while (batch := self._take(self.settings.max_batch_size, self.settings.batch_wait_s, block=True)) is not None:
            live = self._live(batch)
            if not live:
                continue
            self.runs.append(len(live))
            try:
                results = self._compute(self.engine.run_calls, [(w.call, w.cancel, w.progress) for w in live])
            except BaseException as error:  # noqa: BLE001 - every call of the run gets it
                results = [error] * len(live)
            for waiting, result in zip(live, results, strict=True):
                self._deliver(waiting, result)

    def _drain(self) -> None:
        while True:  # closed: fail what still waits
            try:
                waiting = self._queue.get_nowait()
            except queue.Empty:
                return
            if waiting is not _STOP and waiting.future.set_running_or_notify_cancel():
                waiting.future.set_exception(Unavailable("the stage is shutting down"))
