"""The ``@task`` decorator and the component's export.

``@task`` registers the function that runs a job and installs the logging
handler. ``wasmq build`` generates the entry module componentize-py loads:
it imports the user's module (running ``@task``) and exposes
:class:`WitWorld`, whose ``run`` decodes the payload, calls the function,
encodes its result and maps every exception to the WIT ``task-error``:

* a :class:`wasmq.TaskError` (``Retry``, ``Fail``, host and HTTP errors):
  its own mapping;
* a payload that is not JSON: kind ``"bad-payload"``;
* any other exception: kind ``"exception"``, message ``"ValueError: ..."``,
  the traceback logged at error level.
"""

from __future__ import annotations

import json
import logging
import traceback
from typing import Any, Callable, Optional

import wit_world
from componentize_py_types import Err
from wit_world.imports import wasmq_task_types_0_1_0 as wit
from wit_world.imports import wasmq_task_types_0_2_0 as wit_types

from . import log
from .errors import BAD_PAYLOAD, EXCEPTION, TaskError
from .job import Job

__all__ = ["task", "registered", "WitWorld", "TaskFunction"]

#: A task function: ``fn(job, payload) -> JSON-able result``.
TaskFunction = Callable[[Job, Any], Any]

_registered: Optional[TaskFunction] = None
# Made once, at build time (the module is imported into the snapshot), not
# per job as `json.dumps(out, separators=...)` would; NaN and infinities
# are refused because they are not JSON.
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _warm_up() -> None:
    """Run the decode and encode every job does a few times at build time:
    what CPython does on a function's first runs (specialising it, filling
    caches) is then in the snapshot each job starts from instead of being
    done again by every job (about 20,000 fuel a job)."""
    for _ in range(20):
        json.loads('{"a": [1, "x", null, true, 1.5], "b": {}}')
        _encoder.encode({"ok": True, "l": [1, "x", None, 1.5], "d": {}})


_warm_up()
_logger = logging.getLogger("wasmq")


def task(fn: TaskFunction) -> TaskFunction:
    """Mark ``fn(job, payload)`` as the function that runs a job.

    ``payload`` is the job's JSON payload decoded (``None`` when empty);
    the return value is JSON-encoded as the job's result (``None`` ->
    ``null``). Exactly one function per component may carry it.
    """
    global _registered
    if _registered is not None and _registered is not fn:
        raise RuntimeError(
            f"@task is on both {_registered.__module__}.{_registered.__qualname__} "
            f"and {fn.__module__}.{fn.__qualname__}: a component has one task function"
        )
    _registered = fn
    log.install()
    return fn


def registered() -> Optional[TaskFunction]:
    """The function marked ``@task``, if any (the build checks there is one)."""
    return _registered


def _kind(kind: str, message: str) -> Err:
    return Err(wit.TaskError_Kind(wit.KindedError(kind, message)))


def dispatch(ctx: wit_types.JobContext, payload: str) -> str:
    """Run one job; the JSON result, or raise ``Err(task-error)``."""
    if _registered is None:
        raise Err(wit.TaskError_Fail("no function is marked @task in this component"))
    job = Job.from_wit(ctx)
    try:
        args = None if payload.strip() == "" else json.loads(payload)
    except ValueError as e:
        raise _kind(BAD_PAYLOAD, f"payload is not JSON: {e}") from None
    try:
        out = _registered(job, args)
    except TaskError as e:
        raise Err(e.to_wit()) from None
    except BaseException as e:  # SystemExit too: the job ends, the worker does not
        _logger.error("uncaught exception in the task:\n%s", traceback.format_exc().rstrip())
        raise _kind(EXCEPTION, f"{type(e).__name__}: {e}") from None
    try:
        return _encoder.encode(out)
    except (TypeError, ValueError) as e:
        raise Err(wit.TaskError_Fail(f"task result does not serialize to JSON: {e}")) from None


class WitWorld(wit_world.WitWorld):
    """The world ``task``'s export: ``run(job, payload) -> result``."""

    def run(self, job: wit_types.JobContext, payload: str) -> str:
        """Run one job with the function marked ``@task``."""
        return dispatch(job, payload)
