"""A micro-batcher: many callers, one model call per batch, each answer back to its own caller.

    batcher = Batcher(lambda items: [f(x) for x in items], max_batch=32, max_wait_ms=2)
    batcher.submit(item)        # a concurrent.futures.Future, from any thread
    await batcher.run(item)     # the same from asyncio
    batcher.close()             # the queued items are still answered; later submits are refused

How a batch forms. A model worker that is idle runs a lone item at once: at low load nothing waits for
company. While every worker is busy, arriving items queue; the worker that frees up takes up to
`max_batch` of them, oldest first, and, if fewer are there, waits for more until the oldest has waited
`max_wait_ms` since it arrived (never longer, and not at all if it has already waited that long). A
steady stream therefore never starves anyone: the queue is first in, first out, and a batch never skips
an older item for a newer one.

Errors go to their own callers. If a batch call raises, each of its items is run again alone, so a picture
that breaks the model fails only its own request; an item that fails alone gets its exception. A caller
that is cancelled before its batch runs is skipped (an asyncio task cancelled, a Future cancelled).

LoopBatcher does the same on an asyncio event loop's own thread, with no thread and no wait: the server's
processes use it (each has one core's worth of work, and hand-overs between threads cost more than they
save there). A lone item is answered in the loop's next turn; the items that arrive while the loop is busy
are handled in one turn and go as one call.

This module knows nothing of HTTP: the server (serve/inference.py), `mnistlab.load(...).batched()`
(api.py) and anything else that wants batching share it. `predict_asks(predictor)` is the batch function
for a Predictor (the items are prepared 28x28 views, the answers Predictions); `prediction_batcher` wraps it
in a Batcher.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from mnistlab.deploy.predict import Prediction
    from mnistlab.deploy.preprocess import Prepared

T = TypeVar("T")
R = TypeVar("R")

# measured with the Fashion --recipe fast CNN on a 2-core Xeon (docs/deploy.md, "A server that batches"): a batch
# of 32 takes 3.2 ms (0.10 ms a picture, against 0.67 ms for a lone one)
MAX_BATCH = 32
SIZES_KEPT = 10_000  # batch sizes a batcher remembers (`sizes`)
MAX_WAIT_MS = 2.0  # Batcher: beyond the wait for a free worker (a threaded server measured 0, 2, 5 ms: 244, 265, 208/s)


class BatcherClosed(RuntimeError):
    """The batcher was closed: it takes no new items."""


@dataclass
class _Item(Generic[T, R]):
    value: T
    future: Future[R]
    arrived: float  # time.monotonic() when submitted
    crowded: bool  # every worker was busy when it arrived: it may wait (max_wait) for company


class Batcher(Generic[T, R]):
    """Runs `fn(list of items) -> list of answers (same order, same length)` in `workers` threads, batching the
    items that queue up while every worker is busy. `sizes` records the latest batches' sizes (for tests and bench)."""

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, max_batch: int = MAX_BATCH,
                 max_wait_ms: float = MAX_WAIT_MS, workers: int = 1, name: str = "batcher") -> None:
        if max_batch < 1 or workers < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch ({max_batch}) and workers ({workers}) must be >= 1, max_wait_ms "
                             f"({max_wait_ms}) >= 0")
        self.fn, self.max_batch, self.max_wait, self.workers = fn, max_batch, max_wait_ms / 1000, workers
        self.sizes: list[int] = []
        self._queue: deque[_Item[T, R]] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._busy = 0  # workers between taking a batch and answering it
        # started by the first submit: an app or a Classifier that never predicts holds no threads
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]

    def submit(self, item: T) -> Future[R]:
        """Queue one item; its Future holds the answer or the exception its batch raised for it."""
        future: Future[R] = Future()
        with self._ready:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            if self._threads[0].ident is None:
                for thread in self._threads:
                    thread.start()
            self._queue.append(_Item(item, future, time.monotonic(), crowded=self._busy >= self.workers))
            self._ready.notify()
        return future

    async def run(self, item: T) -> R:
        """submit() from asyncio: awaits the answer without holding a thread (cancelling it skips the item)."""
        return await asyncio.wrap_future(self.submit(item))

    def __call__(self, item: T) -> R:
        """submit() and wait: the blocking form, for callers in their own threads."""
        return self.submit(item).result()

    def close(self, timeout: float | None = 10.0) -> None:
        """Take no new items; answer the queued ones, then stop the workers."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for thread in self._threads:
            if thread.ident and thread is not threading.current_thread():
                thread.join(timeout)

    def __enter__(self) -> Batcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_batch(self) -> list[_Item[T, R]] | None:
        """The oldest queued items (at most max_batch), as soon as the batch is due; None once closed and empty."""
        with self._ready:
            while not self._queue:
                if self._closed:
                    return None
                self._ready.wait()
            if self._queue[0].crowded:  # it queued behind busy workers: let more join, bounded by its own wait
                due = self._queue[0].arrived + self.max_wait
                while len(self._queue) < self.max_batch and not self._closed and (left := due - time.monotonic()) > 0:
                    self._ready.wait(left)
                    if not self._queue:  # another worker took them
                        return []
            n = min(self.max_batch, len(self._queue))
            self._busy += 1
            return [self._queue.popleft() for _ in range(n)]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            # a caller that cancelled is dropped here; the rest are marked running (no longer cancellable)
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if live:
                record_size(self.sizes, len(live))
            results = outcomes(self.fn, [item.value for item in live])
            with self._ready:
                if batch:
                    self._busy -= 1  # before the callers hear back: the next item a caller sends finds us idle
            for item, (ok, outcome) in zip(live, results, strict=True):
                if ok:
                    item.future.set_result(outcome)
                else:
                    item.future.set_exception(outcome)


def outcomes(fn: Callable[[list[T]], Sequence[R]], values: list[T]) -> list[tuple[bool, Any]]:
    """(True, answer) or (False, exception) for each value of one batch call, in order. If the call raises, each
    value is run again alone, so only a value that fails alone gets an exception."""
    if not values:
        return []
    try:
        answers = list(fn(values))
        if len(answers) != len(values):
            raise RuntimeError(f"the batch function returned {len(answers)} answers for {len(values)} items")
    except BaseException as e:  # every exception belongs to a caller, not to the batcher
        if len(values) > 1:  # find the culprit: each value alone, so only a failing one fails
            return [outcome for value in values for outcome in outcomes(fn, [value])]
        return [(False, e)]
    return [(True, answer) for answer in answers]


class LoopBatcher(Generic[T, R]):
    """The same batching on an asyncio event loop's own thread, for a server process whose loop does all the work.

        batcher = LoopBatcher(fn, max_batch=32)
        answer = await batcher.run(item)

    No thread and no lock: `run` queues the item and, if no call is due yet, asks the loop to make one as soon as
    the callbacks already waiting have run (`call_soon`). A lone item is therefore answered in the loop's next
    turn, with no wait; items that arrive while the loop is busy (it reads and prepares other requests, or runs
    the model) are all handled in that turn and join the same call, up to max_batch (a full batch runs at once).
    The call runs on the loop's thread: while it runs nothing else does, which is right when a process has one
    core's worth of work (the server's workers) and costs no hand-over between threads, a few hundred
    microseconds each way under load (docs/deploy.md). A failing call is retried item by item (`outcomes`); a
    caller that was cancelled is skipped. Each event loop has its own queue (an app served from two loops, as
    two test clients in two threads do, never mixes their items), so no queue is touched from two threads."""

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch ({max_batch}) must be >= 1")
        self.fn, self.max_batch = fn, max_batch
        self.sizes: list[int] = []  # the latest batches' sizes (at most SIZES_KEPT), for tests and bench
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopQueue[T, R]] = \
            weakref.WeakKeyDictionary()

    async def run(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        queue = self._loops.get(loop)
        if queue is None:
            queue = self._loops[loop] = _LoopQueue()
        future: asyncio.Future[R] = loop.create_future()
        queue.items.append((item, future))
        if len(queue.items) >= self.max_batch:
            self._call(queue)
        elif queue.due is None:
            queue.due = loop.call_soon(self._call, queue)
        return await future

    def _call(self, queue: _LoopQueue[T, R]) -> None:
        """One model call on the queued items (at most max_batch, oldest first); any left over get the next."""
        if queue.due is not None:
            queue.due.cancel()
            queue.due = None
        batch, queue.items = queue.items[:self.max_batch], queue.items[self.max_batch:]
        if queue.items:
            queue.due = asyncio.get_running_loop().call_soon(self._call, queue)
        live = [(item, future) for item, future in batch if not future.done()]  # done: its caller cancelled
        if not live:
            return
        record_size(self.sizes, len(live))
        for (_, future), (ok, outcome) in zip(live, outcomes(self.fn, [item for item, _ in live]), strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(outcome)
            else:
                future.set_exception(outcome)


@dataclass
class _LoopQueue(Generic[T, R]):
    """One event loop's queued items for a LoopBatcher, and the call already asked of that loop."""

    items: list[tuple[T, asyncio.Future[R]]] = field(default_factory=list)
    due: asyncio.Handle | None = None


def record_size(sizes: list[int], n: int) -> None:
    """Append a batch's size, keeping the latest SIZES_KEPT: a server runs for days, one call a few milliseconds."""
    sizes.append(n)
    if len(sizes) > SIZES_KEPT:
        del sizes[:-SIZES_KEPT // 2]


@dataclass(frozen=True)
class Ask:
    """One picture's question to a prediction batcher: its name, its prepared view, how many classes to list."""

    name: str
    prepared: Prepared
    top_k: int


def predict_asks(predictor) -> Callable[[list[Ask]], list[Prediction]]:
    """The batch function of a prediction batcher: predictor.predict_prepared (a Predictor, or anything shaped like
    one) on the asks' views in one model call under torch.inference_mode, each answer listing its own top_k."""
    import torch

    def predict(asks: list[Ask]) -> list[Prediction]:
        k = max(ask.top_k for ask in asks)
        with torch.inference_mode():
            answers = predictor.predict_prepared([(ask.name, ask.prepared) for ask in asks], top_k=k)
        for ask, answer in zip(asks, answers, strict=True):
            answer.top = answer.top[:ask.top_k]
        return answers

    return predict


def prediction_batcher(predictor, *, max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS,
                       workers: int = 1) -> Batcher[Ask, Prediction]:
    """A Batcher (model calls in its own threads) over predict_asks(predictor): for callers in many threads."""
    return Batcher(predict_asks(predictor), max_batch=max_batch, max_wait_ms=max_wait_ms, workers=workers,
                   name="model")
