"""Tenant-scoped atomic counters.

A counter that does not exist reads 0. :func:`incr_once` adds once per
``once_key`` in one atomic host step, so a job that dies mid-way and runs
again (or a duplicate job) counts once, which a step around :func:`incr`
cannot promise. Failed calls raise :class:`wasmq.HostError` subclasses.
"""

from __future__ import annotations

from wit_world.imports import counter as wit

from .errors import host_call

__all__ = ["incr", "get", "incr_once"]


def incr(name: str, delta: int = 1) -> int:
    """Add ``delta`` (may be negative) to counter ``name``; its new value."""
    return host_call(wit.incr, name, int(delta))


def get(name: str) -> int:
    """The current value of counter ``name`` (0 if it does not exist)."""
    return host_call(wit.get, name)


def incr_once(name: str, delta: int, once_key: str) -> int:
    """Add ``delta`` to counter ``name`` once per ``once_key``: the first
    call with a key adds and records the new value; later calls add nothing
    and return the value recorded then."""
    return host_call(wit.incr_once, name, int(delta), once_key)
