""":class:`Job`: the job being run, as the host describes it, and what the
steps of a workflow it waited for returned (:class:`Dependency`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, List, Optional

from wit_world.imports import flow as wit_flow
from wit_world.imports import wasmq_task_types_0_2_0 as wit_types

__all__ = ["Job", "Dependency"]


@dataclass
class Dependency:
    """One step this job waited for, and how it ended."""

    #: The step's job id.
    job_id: str
    #: The step's task.
    task: str
    #: True if it succeeded (``result`` holds its decoded JSON result).
    ok: bool
    #: The step's result, JSON-decoded (``None`` when it failed).
    result: Any = None
    #: How it failed ("CATEGORY: message"); only seen when the flow said
    #: to go on after a failure. ``None`` when it succeeded.
    error: Optional[str] = None


@dataclass
class Job:
    """The job being run."""

    #: Unique id of this job (stable across retries of the same job).
    id: str
    #: Name the task was deployed under (or the file name under ``wasmq run``).
    task: str
    #: Tenant that owns the job; every host call is scoped to it.
    tenant: str
    #: 1 on the first run, 2 on the first retry, and so on.
    attempt: int
    #: Attempts allowed by the task's retry policy (1 = no retries).
    max_attempts: int
    #: The idempotency key the producer gave, if any.
    idempotency_key: Optional[str] = None
    #: The workflow this job is a step of, if any.
    flow_id: Optional[str] = None

    @classmethod
    def from_wit(cls, ctx: wit_types.JobContext) -> "Job":
        """The job of the WIT ``job-context``."""
        return cls(
            ctx.id,
            ctx.task,
            ctx.tenant,
            ctx.attempt,
            ctx.max_attempts,
            ctx.idempotency_key,
            ctx.flow_id,
        )

    @property
    def is_last_attempt(self) -> bool:
        """True if a retry request on this attempt would exhaust the policy."""
        return self.attempt >= self.max_attempts

    def dependencies(self) -> List[Dependency]:
        """The steps this job waited for, in the flow's order, with how each
        ended: a chain's next step gets the previous step's result, a
        chord's ``then`` every member's. Empty outside a workflow (the host
        is asked only for a step of one)."""
        if self.flow_id is None:
            return []
        out = []
        for d in wit_flow.dependencies():
            if isinstance(d.outcome, wit_flow.DependencyOutcome_Succeeded):
                out.append(Dependency(d.job_id, d.task, True, result=json.loads(d.outcome.value)))
            else:
                out.append(Dependency(d.job_id, d.task, False, error=d.outcome.value))
        return out

    def results(self) -> List[Any]:
        """The decoded results of the dependencies that succeeded, in order
        (read :meth:`dependencies` to see the failed ones too)."""
        return [d.result for d in self.dependencies() if d.ok]
