"""Errors: how a job failed and what the host should do about it.

Every error a task raises on purpose, and every error the SDK raises for a
host call, is a :class:`TaskError`. Left uncaught in the task function, each
becomes the WIT ``task-error`` the host acts on, exactly as the Rust SDK maps
its errors:

* :class:`Retry` -> ``retry`` (transient; run the job again);
* :class:`Fail` -> ``fail`` (permanent), or ``kind`` when given a kind;
* :class:`Denied` -> kind ``"denied"``; :class:`Unavailable` -> ``retry``;
  :class:`Invalid` -> ``fail``.

Any other exception is mapped by :mod:`wasmq.task` (kind ``"exception"``).
"""

from __future__ import annotations

import datetime
from typing import Optional, Union

from componentize_py_types import Err
from wit_world.imports import wasmq_task_types_0_1_0 as wit

#: A duration: seconds (int or float) or a :class:`datetime.timedelta`.
Duration = Union[int, float, datetime.timedelta]

#: Kind of a payload that is not JSON (the host's ``bad-payload`` category).
BAD_PAYLOAD = "bad-payload"
#: Kind of a refused capability (host call, HTTP destination).
DENIED = "denied"
#: Kind of a connection failure or timeout.
NETWORK = "network"
#: Kind of an uncaught exception that is not a :class:`TaskError`.
EXCEPTION = "exception"


def to_millis(value: Optional[Duration]) -> Optional[int]:
    """Milliseconds in ``value`` for the WIT interfaces (``None`` stays
    ``None``), rounded up so a short non-zero duration never becomes 0
    ("expire now" / "do not wait"), as the Rust SDK does."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(
            f"a duration is seconds (int or float) or a datetime.timedelta, not {type(value).__name__}"
        )
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {value!r}")
    whole_ns = int(round(seconds * 1_000_000_000))
    return -(-whole_ns // 1_000_000)


class TaskError(Exception):
    """Base of every error that tells the host how a job failed."""

    @property
    def message(self) -> str:
        """The human-readable message kept in the attempt history."""
        return str(self.args[0]) if self.args else ""

    def to_wit(self) -> wit.TaskError:
        """The WIT ``task-error`` this error becomes when left uncaught."""
        return wit.TaskError_Fail(self.message)


class Retry(TaskError):
    """A transient failure: run the job again (until the retry policy's
    attempts are used up).

    ``Retry()``, ``Retry(delay=5)``, ``Retry(message="busy")``,
    ``Retry("busy", delay=5)`` and ``Retry(timedelta(minutes=1), "busy")``
    all work: a str first argument is the message. ``delay`` (seconds or a
    timedelta) overrides the policy's backoff.
    """

    def __init__(
        self,
        *args: Union[Duration, str, None],
        delay: Optional[Duration] = None,
        message: Optional[str] = None,
    ) -> None:
        if len(args) > 2:
            raise TypeError("Retry(delay=None, message=None) takes at most two arguments")
        # `Retry("busy")`, `Retry("busy", 5)`: a str first is the message.
        if args and isinstance(args[0], str):
            given = {"message": args[0], "delay": args[1] if len(args) > 1 else None}
        else:
            given = {"delay": args[0] if args else None, "message": args[1] if len(args) > 1 else None}
        if given["delay"] is not None:
            if delay is not None:
                raise TypeError("Retry: delay given twice")
            delay = given["delay"]  # type: ignore[assignment]
        if given["message"] is not None:
            if message is not None:
                raise TypeError("Retry: message given twice")
            message = given["message"]  # type: ignore[assignment]
        if message is None:
            message = "the task asked to be retried"
        if not isinstance(message, str):
            raise TypeError(f"Retry: the message is a str, not {type(message).__name__}")
        #: The delay as given (seconds or a timedelta), or None for the policy's backoff.
        self.delay: Optional[Duration] = delay
        #: The delay in milliseconds (rounded up), or None.
        self.delay_ms: Optional[int] = to_millis(delay)
        super().__init__(message)

    def to_wit(self) -> wit.TaskError:
        """``retry`` with the message and delay."""
        return wit.TaskError_Retry(wit.RetryRequest(self.message, self.delay_ms))


class Fail(TaskError):
    """A permanent failure (WIT ``fail``): the job is dead-lettered now.

    ``Fail(kind, message)`` or ``Fail(message, kind="mail-api")`` names a
    kind instead (WIT ``kind``): the task's retry policy retries the kinds
    it lists in its auto-retry kinds and fails on any other.
    """

    def __init__(self, *args: str, kind: Optional[str] = None) -> None:
        if len(args) == 2 and kind is None:
            kind, message = args
        elif len(args) == 1:
            (message,) = args
        else:
            raise TypeError("Fail(message), Fail(kind, message) or Fail(message, kind=KIND)")
        self.kind: Optional[str] = kind
        super().__init__(str(message))

    def to_wit(self) -> wit.TaskError:
        """``fail``, or ``kind`` when a kind was given."""
        if self.kind is None:
            return wit.TaskError_Fail(self.message)
        return wit.TaskError_Kind(wit.KindedError(self.kind, self.message))


class LockBusy(Retry):
    """A :class:`wasmq.Lock` another job holds. Left uncaught, the job is
    retried after the policy's backoff."""


class HostError(TaskError):
    """A host call failed (key-value, counter, lock, step, enqueue, flow,
    config, postgres). See the subclasses."""


class Denied(HostError):
    """The capability or name is not granted to this task, or the call
    would pass a tenant quota. Uncaught: kind ``"denied"``."""

    def to_wit(self) -> wit.TaskError:
        """Kind ``"denied"``."""
        return wit.TaskError_Kind(wit.KindedError(DENIED, self.message))


class Invalid(HostError):
    """An argument was malformed or out of range: the same call fails the
    same way again. Uncaught: a permanent failure."""

    def to_wit(self) -> wit.TaskError:
        """``fail`` ("invalid host call: ...")."""
        return wit.TaskError_Fail(f"invalid host call: {self.message}")


class Unavailable(HostError):
    """The host could not serve the call (its store is unreachable, ...):
    not the task's fault. Uncaught: a retry (which does not use up one of
    the job's attempts)."""

    def to_wit(self) -> wit.TaskError:
        """``retry`` ("host unavailable: ...") with the policy's backoff."""
        return wit.TaskError_Retry(wit.RetryRequest(f"host unavailable: {self.message}", None))


def host_error(err: Err) -> HostError:
    """The :class:`HostError` for a failed host call's ``Err`` (whose value
    is the WIT ``host-error`` variant)."""
    value = err.value
    if isinstance(value, wit.HostError_Denied):
        return Denied(value.value)
    if isinstance(value, wit.HostError_Unavailable):
        return Unavailable(value.value)
    if isinstance(value, wit.HostError_Invalid):
        return Invalid(value.value)
    return Invalid(f"unexpected host error {value!r}")


def host_call(fn, *args):  # type: ignore[no-untyped-def]
    """Call the generated binding ``fn`` with ``args``; a failed result
    (``componentize_py_types.Err``) raises the matching :class:`HostError`."""
    try:
        return fn(*args)
    except Err as e:
        raise host_error(e) from None
