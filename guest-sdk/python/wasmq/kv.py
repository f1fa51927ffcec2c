"""The tenant-scoped key-value store.

Keys are resolved inside the job's tenant: the same key names different
entries in different tenants. Values are bytes (a str is stored as UTF-8);
:func:`get_json` and :func:`set_json` store JSON. ``ttl`` is seconds (int or
float) or a :class:`datetime.timedelta`; without it an entry persists.
Failed calls raise :class:`wasmq.HostError` subclasses.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from wit_world.imports import kv as wit

from .errors import Duration, Fail, host_call, to_millis

__all__ = ["get", "get_json", "set", "set_json", "set_if_absent", "delete"]


def _bytes(key: str, value: Union[bytes, bytearray, memoryview, str]) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"kv value for {key!r} must be bytes or str, not {type(value).__name__}")


def get(key: str) -> Optional[bytes]:
    """The value stored under ``key``, or ``None``."""
    return host_call(wit.get, key)


def get_json(key: str) -> Any:
    """The JSON value stored under ``key``, decoded, or ``None`` when the
    key holds nothing. A stored value that is not JSON raises
    :class:`wasmq.Fail` (retrying would read the same bytes)."""
    raw = get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise Fail(f"kv value under {key!r} is not JSON: {e}") from None


def set(key: str, value: Union[bytes, str], ttl: Optional[Duration] = None) -> None:  # noqa: A001
    """Store ``value`` under ``key``, replacing any value; with ``ttl`` the
    entry expires after that long."""
    host_call(wit.set, key, _bytes(key, value), to_millis(ttl))


def set_json(key: str, obj: Any, ttl: Optional[Duration] = None) -> None:
    """Store ``obj`` as JSON under ``key`` (see :func:`set`). An object that
    does not serialize raises :class:`wasmq.Fail`."""
    try:
        encoded = json.dumps(obj, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise Fail(f"value for kv key {key!r} does not serialize to JSON: {e}") from None
    set(key, encoded, ttl)


def set_if_absent(key: str, value: Union[bytes, str], ttl: Optional[Duration] = None) -> bool:
    """Store ``value`` under ``key`` only if ``key`` holds nothing. True if
    it was stored; of concurrent callers exactly one gets True."""
    return host_call(wit.set_if_absent, key, _bytes(key, value), to_millis(ttl))


def delete(key: str) -> bool:
    """Remove ``key``. True if it existed."""
    return host_call(wit.delete, key)
