"""Step markers: :func:`once` runs a named step to success at most once per
key, across retries, duplicate deliveries and other jobs of the tenant.

"At most once" holds for steps that *complete*: if the job dies after the
side effect but before the host records completion, the next delivery runs
the step again. For that window every step has an idempotency token
(:func:`step_token`), the same on every delivery: requests made with
:mod:`wasmq.http` inside a step carry it as their ``Idempotency-Key`` header
(the host adds it unless the request sets its own).
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, Callable, Optional, TypeVar, Union, overload

from wit_world.imports import step as wit

from .errors import Duration, Fail, Retry, host_call, to_millis

__all__ = ["once", "step_token", "DEFAULT_LEASE"]

#: Seconds a claim on a step lasts by default: long enough for an HTTP call
#: with retries, short enough that a crashed job does not block for long.
DEFAULT_LEASE = 60
#: Seconds a job waits before retrying a step another job is running.
BUSY_RETRY_DELAY = 1

F = TypeVar("F", bound=Callable[..., Any])


def step_token(key: str) -> str:
    """The idempotency token of step ``key``: the same on every delivery and
    retry of every job of this tenant naming the step."""
    return wit.idempotency_token(key)


def _run_step(key: str, fn: Callable[[], Any], lease: Duration, ttl: Optional[Duration]) -> Any:
    state = host_call(wit.begin, key, to_millis(lease))
    if isinstance(state, wit.StepState_Done):
        try:
            return json.loads(state.value)
        except ValueError as e:
            raise Fail(f"step {key!r} recorded an output that is not JSON: {e}") from None
    if isinstance(state, wit.StepState_Busy):
        raise Retry(BUSY_RETRY_DELAY, f"step {key} is running in another job")
    try:
        out = fn()
    except BaseException:
        # Best effort: if abandon fails the claim lapses after its lease;
        # the task's own exception is the one worth reporting.
        try:
            wit.abandon(key)
        except Exception:
            pass
        raise
    try:
        encoded = json.dumps(out, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        # A bug in the task: give the claim up rather than block the step.
        try:
            wit.abandon(key)
        except Exception:
            pass
        raise Fail(f"output of step {key!r} does not serialize to JSON: {e}") from None
    # If recording fails the effect happened but is not marked: the error
    # (a retry when the store is unavailable) runs the step again later.
    host_call(wit.complete, key, encoded.encode("utf-8"), to_millis(ttl))
    # Hand back what a later run would read, so both runs see the same value.
    return json.loads(encoded)


@overload
def once(key: str, fn: Callable[[], Any], *, lease: Duration = ..., ttl: Optional[Duration] = ...) -> Any: ...
@overload
def once(key: str, *, lease: Duration = ..., ttl: Optional[Duration] = ...) -> Callable[[F], F]: ...


def once(
    key: str,
    fn: Optional[Callable[[], Any]] = None,
    *,
    lease: Duration = DEFAULT_LEASE,
    ttl: Optional[Duration] = None,
) -> Union[Any, Callable[[F], F]]:
    """Run ``fn()`` unless step ``key`` completed before; its output either way.

    * Completed before (by any job of the tenant): ``fn`` is not called; the
      output recorded then is returned.
    * Not completed: ``fn`` runs; its JSON-able output is recorded and
      returned (as JSON decodes it, so a tuple comes back a list on every
      run). On an exception the claim is abandoned (a retry may run the
      step) and the exception propagates.
    * Another job is running it now: raises ``Retry(delay=1)``.

    ``lease`` (seconds, default 60) is how long this job's claim lasts;
    ``ttl`` how long the completion is remembered (default: forever).

    As a decorator, ``@once("welcome:{user_id}")`` makes every call of the
    function a step whose key is formatted with the call's arguments by
    name (``str.format(**bound_arguments)``)::

        @once("welcome:{user_id}")
        def send_welcome(user_id, email): ...
    """
    if fn is not None:
        return _run_step(key, fn, lease, ttl)

    def decorate(func: F) -> F:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            step_key = key.format(**bound.arguments)
            return _run_step(step_key, lambda: func(*args, **kwargs), lease, ttl)

        return wrapper  # type: ignore[return-value]

    return decorate
