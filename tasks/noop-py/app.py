"""noop-py: the smallest wasmq task in Python. Ignores its payload and
returns ``{"ok": true}``, like the Rust ``noop``.

It measures the host and the Python runtime, not the task: ``wasmq bench
--local --task target/guests/py/noop-py.wasm`` times a fresh instance of
the interpreter per job. Built by ``make py-guests`` with componentize-py
against ``wit/task.wit`` (world ``task``).
"""

import wit_world
from wit_world.imports import wasmq_task_types_0_2_0 as types


class WitWorld(wit_world.WitWorld):
    """The world ``task``'s one export: ``run(job, payload) -> result``."""

    def run(self, job: types.JobContext, payload: str) -> str:
        """Accept any payload, do nothing, report success."""
        return '{"ok": true}'
