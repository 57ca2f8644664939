"""The dynamic batcher on its own: grouping, ordering, length checks, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from visiontune.serving.batching import BatcherStopped, BatchLengthError, DynamicBatcher


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_share_batches_and_each_gets_its_own_answer():
    batches: list[list[int]] = []

    def predict(items: list[int]) -> list[int]:
        batches.append(list(items))
        return [x * 10 for x in items]

    async def main():
        batcher = DynamicBatcher(predict, max_batch_size=8, max_delay_ms=200)
        batcher.start()
        for _ in range(20):
            batcher.announce()
        results = await asyncio.gather(*(batcher.submit(i, announced=True) for i in range(20)))
        await batcher.stop()
        return results

    results = run(main())
    assert [answer for answer, _ in results] == [i * 10 for i in range(20)]
    assert sorted(x for batch in batches for x in batch) == list(range(20))
    assert max(len(b) for b in batches) == 8 and len(batches) == 3
    sizes = {i: size for i, (_, size) in enumerate(results)}
    assert all(sizes[x] == len(b) for b in batches for x in b)


def test_items_count_by_their_size_and_an_oversized_item_runs_alone():
    batches: list[list[int]] = []

    def predict(items):
        batches.append(items)
        return items

    async def main():
        batcher = DynamicBatcher(predict, 4, 100, size_of=lambda x: x)
        batcher.start()
        for _ in range(4):
            batcher.announce()
        await asyncio.gather(*(batcher.submit(n, announced=True) for n in (3, 2, 9, 1)))
        await batcher.stop()

    run(main())
    assert all(sum(b) <= 4 or len(b) == 1 for b in batches)
    assert [9] in batches


def test_a_lone_request_does_not_wait_for_the_batch_window():
    async def main():
        batcher = DynamicBatcher(lambda items: items, max_batch_size=32, max_delay_ms=30_000)
        batcher.start()
        # Nobody else announced: the 30 s window must not apply.
        answer = await asyncio.wait_for(batcher.submit("x"), timeout=5)
        await batcher.stop()
        return answer

    assert run(main()) == ("x", 1)


def test_wrong_number_of_answers_fails_that_batch_not_the_batcher():
    calls = []

    def predict(items):
        calls.append(len(items))
        return items[:-1] if len(items) > 1 else items

    async def main():
        batcher = DynamicBatcher(predict, 8, 200)
        batcher.start()
        batcher.announce()
        batcher.announce()
        outcomes = await asyncio.gather(
            batcher.submit(1, announced=True),
            batcher.submit(2, announced=True),
            return_exceptions=True,
        )
        later = await batcher.submit(3)
        await batcher.stop()
        return outcomes, later

    outcomes, later = run(main())
    assert all(isinstance(o, BatchLengthError) for o in outcomes)
    assert "1 answers for 2 items" in str(outcomes[0])
    assert later == (3, 1)


def test_an_exception_in_predict_reaches_every_request_of_the_batch():
    def predict(items):
        if "bad" in items:
            raise RuntimeError("model exploded")
        return items

    async def main():
        batcher = DynamicBatcher(predict, 8, 200)
        batcher.start()
        batcher.announce()
        batcher.announce()
        outcomes = await asyncio.gather(
            batcher.submit("bad", announced=True),
            batcher.submit("ok", announced=True),
            return_exceptions=True,
        )
        after = await batcher.submit("fine")
        await batcher.stop()
        return outcomes, after

    outcomes, after = run(main())
    assert [str(o) for o in outcomes] == ["model exploded", "model exploded"]
    assert after == ("fine", 1)


def test_a_cancelled_request_is_not_predicted():
    seen = []
    release = threading.Event()

    def predict(items):
        seen.extend(items)
        release.wait(5)
        return items

    async def main():
        batcher = DynamicBatcher(predict, 1, 0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("first"))
        await asyncio.sleep(0.05)  # "first" is now being predicted
        second = asyncio.ensure_future(batcher.submit("timed-out"))
        await asyncio.sleep(0.01)
        second.cancel()
        release.set()
        assert await first == ("first", 1)
        third = await batcher.submit("third")
        await batcher.stop()
        return third

    assert run(main()) == ("third", 1)
    assert "timed-out" not in seen


def test_stop_finishes_queued_work_then_refuses_new_items():
    async def main():
        batcher = DynamicBatcher(lambda items: items, 2, 50)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
        await asyncio.sleep(0)
        await batcher.stop()
        done = [await p for p in pending]
        with pytest.raises(BatcherStopped):
            await batcher.submit(99)
        return done

    assert [answer for answer, _ in run(main())] == [0, 1, 2, 3, 4]
