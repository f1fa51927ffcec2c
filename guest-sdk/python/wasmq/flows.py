"""Workflows: build a definition from nodes and :func:`start` it.

A node is a plain dict in the shape a ``wasmq flow FLOW.json`` file holds:
:func:`step` ``{"task": ..., "payload": ...}``, :func:`chain`,
:func:`group` and :func:`chord`; any node may carry
``on_failure="continue"`` (later steps run even if it ends dead). Nothing
waits: the steps run as their dependencies finish, and a step reads what it
waited for with :meth:`wasmq.Job.dependencies` / :meth:`wasmq.Job.results`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from wit_world.imports import flow as wit

from .errors import Invalid, host_call

__all__ = ["step", "chain", "group", "chord", "start", "Started", "Node"]

#: A workflow node: the JSON object a flow definition holds.
Node = Dict[str, Any]


def _with(node: Node, on_failure: Optional[str]) -> Node:
    if on_failure is not None:
        if on_failure != "continue":
            raise ValueError(f'on_failure is "continue" or None, not {on_failure!r}')
        node["on_failure"] = on_failure
    return node


def step(task: str, payload: Any = None, *, on_failure: Optional[str] = None) -> Node:
    """One job of task ``task`` with ``payload``."""
    return _with({"task": task, "payload": payload}, on_failure)


def chain(*nodes: Node, on_failure: Optional[str] = None) -> Node:
    """``nodes`` one after another; each step gets the previous one's result."""
    return _with({"chain": list(nodes)}, on_failure)


def group(*nodes: Node, on_failure: Optional[str] = None) -> Node:
    """``nodes`` side by side."""
    return _with({"group": list(nodes)}, on_failure)


def chord(group_nodes: List[Node], then: Node, *, on_failure: Optional[str] = None) -> Node:
    """``group_nodes`` side by side, then ``then`` with every member's result."""
    return _with({"chord": {"group": list(group_nodes), "then": then}}, on_failure)


@dataclass
class Started:
    """A started workflow."""

    #: The workflow's id.
    flow_id: str
    #: Every job of the flow, in the order its steps appear in the definition.
    job_ids: List[str] = field(default_factory=list)


def start(node: Node) -> Started:
    """Start the workflow ``node``. Idempotent per job: a retried or
    redelivered job gets the same flows back (the n-th ``start`` of a job
    is the same flow on every delivery)."""
    try:
        definition = json.dumps(node, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise Invalid(f"flow definition does not serialize to JSON: {e}") from None
    started = host_call(wit.start, definition)
    return Started(started.flow_id, list(started.job_ids))
