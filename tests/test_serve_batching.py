"""shelf serve's dynamic batcher: requests waiting while the kernel runs share its next call, each gets its own
answer, a failing batch fails only its own requests, and an idle service runs a lone request at once."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime

import pytest

from pipelines.serve.batching import Batcher
from pipelines.serve.ranking import Ask, Ranked

NOW = datetime(2026, 11, 1)


def ask(user: str) -> Ask:
    return Ask(user, (), 10, NOW)


class Kernel:
    """Answers each ask with its user id; the first call waits until released, so others queue behind it."""

    def __init__(self, fail_users: frozenset[str] = frozenset()) -> None:
        self.calls: list[list[str]] = []
        self.release = threading.Event()
        self.fail_users = fail_users

    def __call__(self, asks: list[Ask]) -> list[Ranked]:
        self.calls.append([a.user_id for a in asks])
        if len(self.calls) == 1:
            assert self.release.wait(10)
        if self.fail_users & {a.user_id for a in asks}:
            raise RuntimeError("kernel failed")
        return [Ranked([{"item_id": a.user_id}], "reranked", "r1") for a in asks]


async def _gather(batcher: Batcher, kernel: Kernel, users: list[str]) -> list[Ranked | BaseException]:
    first = asyncio.ensure_future(batcher.rank(ask(users[0])))
    while not kernel.calls:  # the first request is in the kernel
        await asyncio.sleep(0.001)
    rest = [asyncio.ensure_future(batcher.rank(ask(u))) for u in users[1:]]
    await asyncio.sleep(0.01)  # all queued behind the running call
    kernel.release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_requests_queued_behind_a_running_call_share_the_next_one_and_get_their_own_answers() -> None:
    kernel = Kernel()
    batcher = Batcher(kernel, max_batch=3)
    answers = asyncio.run(_gather(batcher, kernel, ["a", "b", "c", "d", "e", "f"]))
    assert [a.items[0]["item_id"] for a in answers] == ["a", "b", "c", "d", "e", "f"]  # type: ignore[union-attr]
    assert kernel.calls == [["a"], ["b", "c", "d"], ["e", "f"]]  # at most max_batch per call, in arrival order
    assert (batcher.batches, batcher.batched) == (3, 6)
    assert not batcher.running and not batcher.pending


def test_a_failing_call_fails_only_its_own_requests() -> None:
    kernel = Kernel(fail_users=frozenset({"c"}))
    batcher = Batcher(kernel, max_batch=2)
    answers = asyncio.run(_gather(batcher, kernel, ["a", "b", "c", "d"]))
    assert kernel.calls == [["a"], ["b", "c"], ["d"]]
    assert isinstance(answers[0], Ranked) and isinstance(answers[3], Ranked)
    assert all(isinstance(a, RuntimeError) for a in answers[1:3])
    failing = Kernel(fail_users=frozenset({"x"}))
    failing.release.set()
    lone = Batcher(failing)
    with pytest.raises(RuntimeError):
        asyncio.run(lone.rank(ask("x")))
    assert asyncio.run(lone.rank(ask("y"))).items == [{"item_id": "y"}]  # and it still serves


def test_a_lone_request_runs_at_once_and_a_wait_gathers_a_burst() -> None:
    seen: list[list[str]] = []

    def kernel(asks: list[Ask]) -> list[Ranked]:
        seen.append([a.user_id for a in asks])
        return [Ranked([], "reranked", "r1") for _ in asks]

    async def burst(batcher: Batcher) -> None:
        await asyncio.gather(*(batcher.rank(ask(u)) for u in "abcd"))

    asyncio.run(Batcher(kernel).rank(ask("solo")))
    asyncio.run(burst(Batcher(kernel, wait_seconds=0.02)))
    assert seen == [["solo"], ["a", "b", "c", "d"]]
