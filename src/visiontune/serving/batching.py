"""Dynamic batching: concurrent requests are predicted together, each answer goes back to its own.

The HTTP app decodes each request on its own (in a thread pool), then hands the decoded item
to :class:`DynamicBatcher`. One collector task groups waiting items until the batch holds
``max_batch_size`` images or ``max_delay_ms`` has passed since the first one arrived, runs the
batch's prediction in a worker thread (torch and onnxruntime release the GIL, so the event loop
keeps accepting and decoding while the model runs), checks that it got one answer per item and
resolves each request's future with its own answer.

The batcher knows nothing about HTTP, images or models: it batches any items with any
``predict(list) -> list`` function, which keeps it testable on its own.

Latency at low load: waiting ``max_delay_ms`` for company that is not coming would add that
delay to every lone request. The app therefore *announces* each request when it starts
decoding; the collector only waits for more items while some announced request is still being
decoded. Under load, items pile up in the queue while the previous batch runs, so batches fill
without any waiting at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class BatchLengthError(RuntimeError):
    """The batch predict function returned a different number of answers than items."""


class BatcherStopped(RuntimeError):
    """An item was submitted after :meth:`DynamicBatcher.stop`."""


@dataclass
class _Pending(Generic[T, R]):
    item: T
    size: int
    future: asyncio.Future[tuple[R, int]]


class DynamicBatcher(Generic[T, R]):
    """Group concurrently submitted items into batches for one ``predict`` function.

    Args:
        predict: called in a worker thread with a list of items; must return a list of the same
            length, answer ``i`` for item ``i``.
        max_batch_size: the most images in one batch (items may count as several, see
            ``size_of``). An item larger than this is predicted alone.
        max_delay_ms: the longest the first item of a batch waits for others.
        size_of: how many images an item holds (default 1 each).
        executor: where ``predict`` runs; default a private single thread, so batches run one
            at a time while the next one is being collected.
        on_batch: called with each batch's image count (metrics).
    """

    def __init__(
        self,
        predict: Callable[[list[T]], Sequence[R]],
        max_batch_size: int = 32,
        max_delay_ms: float = 10.0,
        *,
        size_of: Callable[[T], int] = lambda item: 1,
        executor: Executor | None = None,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.size_of = size_of
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="visiontune-batch")
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending[T, R] | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._carry: _Pending[T, R] | None = None
        self._announced = 0
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the collector task on the running event loop."""
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        """Predict everything already submitted, then stop the collector."""
        if self._task is None:
            return
        self._stopping = True
        assert self._queue is not None
        self._queue.put_nowait(None)  # after every item already queued: FIFO drains them first
        await self._task
        self._task = None
        if self._own_executor:
            self.executor.shutdown(wait=True)

    # ------------------------------------------------------------------ submitting

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the batch being predicted)."""
        queued = self._queue.qsize() if self._queue is not None else 0
        return queued + (1 if self._carry is not None else 0)

    def announce(self) -> None:
        """Say that an item is being prepared and will be submitted (or withdrawn) soon."""
        self._announced += 1

    def withdraw(self) -> None:
        """Take back an :meth:`announce` whose item will never come (it failed to decode)."""
        self._announced = max(0, self._announced - 1)

    async def submit(self, item: T, *, announced: bool = False) -> tuple[R, int]:
        """Queue ``item`` and wait for its answer.

        Args:
            item: one request's decoded input.
            announced: ``True`` when :meth:`announce` was called for this item.

        Returns:
            ``(answer, batch_size)``: this item's answer and how many images its batch held.

        Raises:
            BatcherStopped: the batcher is stopping or was never started.
            Exception: whatever ``predict`` raised for the batch this item was in.
        """
        if announced:
            self.withdraw()
        if self._queue is None or self._stopping:
            raise BatcherStopped("the server is shutting down; retry on another instance")
        future: asyncio.Future[tuple[R, int]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(item, max(1, int(self.size_of(item))), future))
        return await future

    # ------------------------------------------------------------------ the collector

    async def _next(self, timeout: float | None) -> _Pending[T, R] | None:
        assert self._queue is not None
        if timeout is None:
            return await self._queue.get()
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        stop_seen = False
        while not stop_seen or self._carry is not None:
            first = self._carry
            self._carry = None
            if first is None:
                first = await self._next(None)
                if first is None:
                    break
            batch, images = [first], first.size
            deadline = loop.time() + self.max_delay
            while images < self.max_batch_size and not stop_seen:
                assert self._queue is not None
                if self._queue.empty() and self._announced == 0:
                    break  # nobody else is coming: do not make this batch wait
                remaining = deadline - loop.time()
                try:
                    pending = (
                        self._queue.get_nowait() if remaining <= 0 else await self._next(remaining)
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if pending is None:
                    stop_seen = True
                    break
                if images + pending.size > self.max_batch_size:
                    self._carry = pending  # starts the next batch
                    break
                batch.append(pending)
                images += pending.size
            await self._run(loop, batch)
        # Anything still queued after the sentinel (submitted while stopping) is refused.
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if pending is not None and not pending.future.done():
                pending.future.set_exception(BatcherStopped("the server is shutting down"))

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[T, R]]) -> None:
        # A request that timed out or whose client went away is not predicted.
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        images = sum(p.size for p in live)
        if self.on_batch is not None:
            self.on_batch(images)
        try:
            answers = await loop.run_in_executor(
                self.executor, self.predict, [p.item for p in live]
            )
            if len(answers) != len(live):
                raise BatchLengthError(
                    f"batch predict returned {len(answers)} answers for {len(live)} items"
                )
        except Exception as e:  # one failing batch fails its requests, never the collector
            log.exception("batch of %d images failed", images)
            for p in live:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        for p, answer in zip(live, answers, strict=True):
            if not p.future.done():
                p.future.set_result((answer, images))
