"""Dynamic batching: requests that need the kernel while it is busy wait together and run as one kernel call.

As Triton's dynamic batcher does, without a fixed delay by default: the first request of an idle service runs at
once (no added latency for one client); requests arriving while a batch runs queue up and form the next batch
(at most `serve.max_batch`). `serve.batch_wait_ms` > 0 holds each batch open that long to gather more. The
kernel runs on one worker thread, so the event loop keeps reading requests while it computes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pipelines.serve.ranking import Ask, Ranked

Compute = Callable[[list[Ask]], list[Ranked]]


class Batcher:
    """Gathers the kernel's requests on the event loop and runs them in batches on one thread."""

    def __init__(self, compute: Compute, max_batch: int = 64, wait_seconds: float = 0.0) -> None:
        self.compute, self.max_batch, self.wait_seconds = compute, max_batch, wait_seconds
        self.pending: list[tuple[Ask, asyncio.Future[Ranked]]] = []
        self.running = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shelf-kernel")
        self.batches = 0
        self.batched = 0

    async def rank(self, ask: Ask) -> Ranked:
        """The request's list, computed in the next batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Ranked] = loop.create_future()
        self.pending.append((ask, future))
        if not self.running:  # only the event loop's thread touches `pending` and `running`
            self.running = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                if self.wait_seconds > 0:
                    await asyncio.sleep(self.wait_seconds)
                batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
                try:
                    answers = await loop.run_in_executor(self.executor, self.compute, [ask for ask, _ in batch])
                except Exception as exc:  # the batch's requests fail with it (each answers 500); the next batch runs
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.batches += 1
                self.batched += len(batch)
                for (_, future), answer in zip(batch, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)
        finally:
            self.running = False
