"""Dynamic batching, as Ray Serve's `@serve.batch` does it: callers' requests wait on a queue and run
together, flushed when nobody else can join (`full`) or when the window since the first one ends.

`run(requests)` returns one result per request, in order; a result that is an Exception fails only
its caller. If `run` raises, or returns the wrong number of results, every caller of the batch gets
the error: no caller waits forever for an answer that was never set.

`in_thread=True` runs each batch in a worker thread, one batch at a time (the event loop stays free to
answer other calls meanwhile; requests that arrive during a batch form the next one, up to `max_size`).
"""

import asyncio
from typing import Any, Callable


class BatchSizeMismatch(RuntimeError):
    """The batch function answered a different number of requests than it was given."""


class Batcher:
    def __init__(self, run: Callable[[list], list], window_s: float, full: Callable[[list], bool] = lambda _: False,
                 in_thread: bool = False, max_size: int | None = None):
        self.run, self.window_s, self.full = run, window_s, full
        self.in_thread, self.max_size = in_thread, max_size
        self.queue: list[tuple[Any, asyncio.Future]] = []
        self.timer: asyncio.Task | None = None
        self.busy = False  # in_thread: a batch is running; the next starts when it ends
        self.sizes: dict[int, int] = {}  # {requests in a batch: batches}

    async def submit(self, request):
        future = asyncio.get_running_loop().create_future()
        self.queue.append((request, future))
        self.schedule()
        return await future

    def schedule(self) -> None:
        if self.busy:
            return
        if self.full([r for r, _ in self.queue]):
            self.flush()
        elif self.timer is None:
            self.timer = asyncio.ensure_future(self._flush_after_window())

    async def _flush_after_window(self) -> None:
        await asyncio.sleep(self.window_s)
        self.timer = None
        if not self.busy:
            self.flush()

    def flush(self) -> None:
        take = len(self.queue) if self.max_size is None else self.max_size
        queue, self.queue = self.queue[:take], self.queue[take:]
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not queue:
            return
        self.sizes[len(queue)] = self.sizes.get(len(queue), 0) + 1
        if self.in_thread:
            self.busy = True
            asyncio.ensure_future(self._run_in_thread(queue))
        else:
            try:
                results = self.run([request for request, _ in queue])
            except Exception as e:
                results = e
            self._answer(queue, results)

    async def _run_in_thread(self, queue) -> None:
        try:
            results = await asyncio.to_thread(self.run, [request for request, _ in queue])
        except Exception as e:
            results = e
        self._answer(queue, results)
        self.busy = False
        if self.queue:  # these waited for the batch that just ended: no further window
            self.flush()

    def _answer(self, queue, results) -> None:
        """Each caller its result; all of them the error if the batch raised (`results` is it) or
        answered the wrong number of requests."""
        if not isinstance(results, Exception) and len(results) != len(queue):
            results = BatchSizeMismatch(f"{len(results)} results for {len(queue)} requests")
        if isinstance(results, Exception):  # a failed batch fails every caller in it
            for _, future in queue:
                if not future.done():
                    future.set_exception(results)
            return
        for (_, future), result in zip(queue, results):
            if future.done():  # its caller gave up (cancelled) while it waited
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
