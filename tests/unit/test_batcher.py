"""pipeline.batching.Batcher: every caller is answered or failed, and a wrong result count fails them all."""

import asyncio

import pytest

from pipeline.batching import BatchSizeMismatch, Batcher


def run(coro):
    return asyncio.run(coro)


def test_full_batches_flush_at_once_and_each_caller_gets_its_result():
    seen = []

    def double(requests):
        seen.append(list(requests))
        return [2 * r for r in requests]

    async def main():
        batcher = Batcher(double, window_s=60, full=lambda queued: len(queued) == 3)
        return await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3))), 5), batcher

    results, batcher = run(main())
    assert results == [2, 4, 6] and seen == [[1, 2, 3]] and batcher.sizes == {3: 1}


def test_the_window_flushes_a_batch_that_is_not_full():
    async def main():
        batcher = Batcher(lambda rs: rs, window_s=0.01)
        return await asyncio.wait_for(asyncio.gather(batcher.submit("a"), batcher.submit("b")), 5)

    assert run(main()) == ["a", "b"]


def test_an_exception_result_fails_only_its_caller():
    async def main():
        batcher = Batcher(lambda rs: [ValueError(r) if r == "bad" else r for r in rs], window_s=0.01)
        return await asyncio.gather(batcher.submit("ok"), batcher.submit("bad"), return_exceptions=True)

    ok, bad = run(main())
    assert ok == "ok" and isinstance(bad, ValueError)


@pytest.mark.parametrize("run_batch", [lambda rs: rs[:-1], lambda rs: 1 / 0], ids=["too few results", "raises"])
def test_a_failed_batch_fails_every_caller_instead_of_leaving_them_waiting(run_batch):
    async def main():
        batcher = Batcher(run_batch, window_s=0.01)
        return await asyncio.wait_for(asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True), 5)

    errors = run(main())
    assert len(errors) == 2 and all(isinstance(e, (BatchSizeMismatch, ZeroDivisionError)) for e in errors)
