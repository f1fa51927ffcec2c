"""Child jobs: :func:`enqueue` a task of the job's own tenant."""

from __future__ import annotations

import json
from typing import Any, Optional

from wit_world.imports import jobs as wit

from .errors import Duration, Invalid, host_call, to_millis

__all__ = ["enqueue"]


def enqueue(
    task: str,
    payload: Any = None,
    *,
    countdown: Optional[Duration] = None,
    idempotency_key: Optional[str] = None,
) -> str:
    """Enqueue task ``task`` with ``payload`` (JSON-encoded); the new job's id.

    ``countdown`` (seconds or a timedelta) delays its start;
    ``idempotency_key`` deduplicates it. A payload that does not serialize
    raises :class:`wasmq.Invalid`; a refused enqueue (task not granted,
    tenant quota) raises :class:`wasmq.Denied`.
    """
    try:
        encoded = json.dumps(payload, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise Invalid(f"payload for {task!r} does not serialize to JSON: {e}") from None
    options = wit.EnqueueOptions(to_millis(countdown), idempotency_key)
    return host_call(wit.enqueue, task, encoded, options)
