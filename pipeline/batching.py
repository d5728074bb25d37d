"""Dynamic batching, as Ray Serve's `@serve.batch` does it: callers' requests wait on a queue and run
together, flushed when nobody else can join (`full`) or when the window since the first one ends.

`run(requests)` returns one result per request, in order; a result that is an Exception fails only
its caller. If `run` raises, or returns the wrong number of results, every caller of the batch gets
the error: no caller waits forever for an answer that was never set.
"""

import asyncio
from typing import Any, Callable


class BatchSizeMismatch(RuntimeError):
    """The batch function answered a different number of requests than it was given."""


class Batcher:
    def __init__(self, run: Callable[[list], list], window_s: float, full: Callable[[list], bool] = lambda _: False):
        self.run, self.window_s, self.full = run, window_s, full
        self.queue: list[tuple[Any, asyncio.Future]] = []
        self.timer: asyncio.Task | None = None
        self.sizes: dict[int, int] = {}  # {requests in a batch: batches}

    async def submit(self, request):
        future = asyncio.get_running_loop().create_future()
        self.queue.append((request, future))
        if self.full([r for r, _ in self.queue]):
            self.flush()
        elif self.timer is None:
            self.timer = asyncio.ensure_future(self._flush_after_window())
        return await future

    async def _flush_after_window(self) -> None:
        await asyncio.sleep(self.window_s)
        self.timer = None
        self.flush()

    def flush(self) -> None:
        queue, self.queue = self.queue, []
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not queue:
            return
        self.sizes[len(queue)] = self.sizes.get(len(queue), 0) + 1
        try:
            results = self.run([request for request, _ in queue])
            if len(results) != len(queue):
                raise BatchSizeMismatch(f"{len(results)} results for {len(queue)} requests")
        except Exception as e:  # a failed batch fails every caller in it
            for _, future in queue:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), result in zip(queue, results):
            if future.done():  # its caller gave up (cancelled) while it waited
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
