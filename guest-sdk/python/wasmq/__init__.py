"""wasmq: write wasmq tasks in Python.

A wasmq task is a WebAssembly component; ``wasmq build app.py -o app.wasm``
makes one from a Python file with one function marked :func:`task`::

    import logging
    from wasmq import task, Job, Retry, once, http

    log = logging.getLogger(__name__)

    @task
    def run(job: Job, payload):
        log.info("attempt %d of %d", job.attempt, job.max_attempts)
        resp = once(f"welcome:{payload['user_id']}",
                    lambda: http.post(payload["mail_api"], json=payload).status_code)
        if resp == 429:
            raise Retry("mail API is busy", delay=30)
        return {"ok": True}

Every job runs in a fresh instance, so module globals do not survive between
jobs: whatever must survive a retry, a duplicate delivery or another worker
goes through the host: :mod:`wasmq.kv`, :mod:`wasmq.counters`,
:class:`Lock`, :func:`once`. See ``guest-sdk/python/README.md``.
"""

import sys as _sys

from . import config, counters, flows, http, kv, postgres

# `counter` is the same module as `counters`, under the Rust SDK's (and
# the WIT interface's) name: `from wasmq import counter` and
# `import wasmq.counter` both work.
counter = counters
_sys.modules[__name__ + ".counter"] = counters
from .errors import (
    BAD_PAYLOAD,
    DENIED,
    EXCEPTION,
    NETWORK,
    Denied,
    Fail,
    HostError,
    Invalid,
    LockBusy,
    Retry,
    TaskError,
    Unavailable,
)
from .job import Dependency, Job
from .jobs import enqueue
from .lock import Lease, Lock
from .steps import once, step_token
from .task import task

__all__ = [
    "task",
    "Job",
    "Dependency",
    "TaskError",
    "Retry",
    "Fail",
    "LockBusy",
    "HostError",
    "Denied",
    "Invalid",
    "Unavailable",
    "BAD_PAYLOAD",
    "DENIED",
    "EXCEPTION",
    "NETWORK",
    "kv",
    "counters",
    "counter",
    "Lock",
    "Lease",
    "once",
    "step_token",
    "enqueue",
    "flows",
    "config",
    "postgres",
    "http",
]
