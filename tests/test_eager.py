"""proxy.runtime.eager.start_eagerly: a dual write's secondary half started at once, a task only from its first wait on.

Whatever a coroutine does, started eagerly it must end exactly as it would in a task (same result, same error, same
steps taken), only sooner; and it must behave like a task towards cancellation and context variables.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.runtime.eager import start_eagerly

STEPS = st.lists(st.sampled_from(["work", "yield", "wait"]), max_size=6)
ENDINGS = st.sampled_from(["return", "raise"])


async def scripted(steps: list[str], ending: str, trace: list[str]) -> str:
    """Follows `steps`: plain work, a bare loop turn, or a wait on a future something else resolves later."""
    loop = asyncio.get_running_loop()
    for i, step in enumerate(steps):
        if step == "yield":
            await asyncio.sleep(0)
        elif step == "wait":
            fut: asyncio.Future[int] = loop.create_future()
            loop.call_soon(fut.set_result, i)
            trace.append(f"woke {await fut}")
        trace.append(f"{step} {i}")
    if ending == "raise":
        raise ValueError(f"failed after {len(steps)} steps")
    return f"done after {len(steps)} steps"


async def outcome(fut: asyncio.Future[str]) -> tuple[str, str]:
    try:
        return "result", await fut
    except ValueError as exc:
        return "error", str(exc)


@settings(max_examples=200, deadline=None)
@given(steps=STEPS, ending=ENDINGS)
def test_an_eager_start_ends_as_a_task_would(steps: list[str], ending: str) -> None:
    async def run() -> None:
        in_task: list[str] = []
        eager: list[str] = []
        expected = await outcome(asyncio.ensure_future(scripted(steps, ending, in_task)))
        started = start_eagerly(scripted(steps, ending, eager))
        if "yield" not in steps and "wait" not in steps:
            assert started.done()  # finished before start_eagerly returned: no task, no loop turn
            assert not isinstance(started, asyncio.Task)
        assert await outcome(started) == expected
        assert eager == in_task

    asyncio.run(run())


@pytest.mark.parametrize("task_ran", [False, True])
async def test_a_cancelled_eager_start_cancels_the_coroutine_at_its_wait(task_ran: bool) -> None:
    """Cancelled before the task took its first step, or while it waits: either way the coroutine sees the
    cancellation where it waits, as in a task."""
    cleaned: list[str] = []
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waits() -> None:
        try:
            await gate
        except asyncio.CancelledError:
            cleaned.append("saw the cancellation")
            raise
        finally:
            cleaned.append("finally ran")

    started = start_eagerly(waits())
    assert not started.done()
    if task_ran:
        await asyncio.sleep(0)
    started.cancel()
    with pytest.raises(asyncio.CancelledError):
        await started
    assert cleaned == ["saw the cancellation", "finally ran"]
    assert gate.cancelled()  # what it waited on was cancelled too, as a task does


async def test_context_set_before_the_first_wait_is_reset_after_it_in_the_same_context() -> None:
    """A span opened before the secondary's first wait is closed after it: both must happen in one context, or
    resetting the variable fails ("created in a different Context"). The caller's context is left untouched."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="caller")

    async def sets_and_resets() -> str:
        token = var.set("inside")
        await asyncio.sleep(0)
        seen = var.get()
        var.reset(token)
        return seen

    started = start_eagerly(sets_and_resets())
    assert var.get() == "caller"
    assert await started == "inside"
    assert var.get() == "caller"


async def test_an_error_thrown_into_the_wait_reaches_the_coroutine() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[Any] = loop.create_future()

    async def waits() -> str:
        try:
            await gate
        except KeyError as exc:
            return f"handled {exc}"
        return "not reached"

    started = start_eagerly(waits())
    gate.set_exception(KeyError("boom"))
    assert await started == "handled 'boom'"
