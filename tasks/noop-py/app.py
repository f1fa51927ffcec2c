"""noop-py: the smallest wasmq task in Python. Ignores its payload and
returns ``{"ok": true}``, like the Rust ``noop``.

It measures the host and the Python runtime, not the task: ``wasmq bench
--local --task target/guests/py/noop-py.wasm`` times a fresh instance of
the interpreter per job. Built by ``make py-guests`` with ``wasmq build``
(the ``wasmq`` Python SDK, guest-sdk/python/).
"""

from wasmq import Job, task


@task
def run(job: Job, payload: object) -> dict:
    """Accept any payload, do nothing, report success."""
    return {"ok": True}
