"""Start a coroutine right away and make it a task only if it has to wait: Python 3.12's eager tasks, on 3.11.

A dual write runs the secondary's half alongside the primary's. On the embedded store a small write finishes
without ever waiting (it runs inline on the loop), so a plain task only adds its scheduling: a loop turn to start
it, and a waiter, a timer and another turn for the engine to learn it is done. Started eagerly, it is simply done;
a half that does wait (a network store, a stall) becomes an ordinary task from that wait on, so the primary's half
is never held up by it.

`consume` is for the other end of such work: the outcome of a future nobody waits for any more.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def start_eagerly(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run `coro` up to its first wait now; a future holding its outcome, or the task that carries it on."""
    loop = asyncio.get_running_loop()
    # Its own context from the first step on, as a task has: a span or a contextvar set before the first wait is
    # then reset in the same context after it.
    context = contextvars.copy_context()
    try:
        waiting_on = context.run(coro.send, None)
    except StopIteration as finished:
        done: asyncio.Future[T] = loop.create_future()
        done.set_result(finished.value)
        return done
    except Exception as exc:
        failed: asyncio.Future[T] = loop.create_future()
        failed.set_exception(exc)
        return failed
    task = loop.create_task(_carry_on(coro, waiting_on), context=context)

    def cancelled_before_carrying_on(_: asyncio.Task[T]) -> None:
        # A task cancelled before its first step never runs its coroutine, so `coro` would stay suspended with its
        # handlers unrun: cancel what it waits on and throw the cancellation in, as a cancelled task would have.
        if inspect.getcoroutinestate(coro) != inspect.CORO_SUSPENDED:
            return
        if isinstance(waiting_on, asyncio.Future):
            waiting_on.cancel()
        try:
            coro.throw(asyncio.CancelledError())
        except (Exception, asyncio.CancelledError):
            return  # it finished: returned, re-raised the cancellation, or raised something else
        coro.close()  # it swallowed the cancellation and waits again, where nothing would ever resume it

    task.add_done_callback(cancelled_before_carrying_on, context=context)
    return task


async def _carry_on(coro: Coroutine[Any, Any, T], waiting_on: Any) -> T:
    return await _relay(coro, waiting_on)


@types.coroutine
def _relay(coro: Coroutine[Any, Any, T], waiting_on: Any) -> Generator[Any, Any, T]:
    """Hand what `coro` waits on to the task running us, and the task's answers (a result or a cancellation) back to
    `coro`, until it returns. The awaited future still carries its blocking mark, so the task waits on it as usual."""
    while True:
        try:
            answer = yield waiting_on
        except BaseException as exc:  # a cancellation or an error thrown in: passed on to `coro`, not handled
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as finished:
                return finished.value  # type: ignore[no-any-return]
        else:
            try:
                waiting_on = coro.send(answer)
            except StopIteration as finished:
                return finished.value  # type: ignore[no-any-return]


def consume(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of work nobody waits for any more (a late secondary write, whose keys are already
    queued; a backfill read or apply dropped for a retry) so asyncio does not warn."""
    if not task.cancelled():
        task.exception()
