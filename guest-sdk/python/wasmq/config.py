"""Configuration and secrets, by a name the task's policy grants
(``secrets = ["mail_api_key"]`` under ``[sandbox]`` in ``task.toml``).

The host looks the name up in the job's own tenant only: the task's value
if one was set for it, else the tenant's. A name the policy does not grant
raises :class:`wasmq.Denied` (and is recorded among the job's denials).
"""

from __future__ import annotations

from typing import Optional

from wit_world.imports import config as wit

from .errors import host_call

__all__ = ["get"]


def get(name: str) -> Optional[str]:
    """The value of secret ``name``, or ``None`` when the policy grants it
    but nobody set it."""
    return host_call(wit.get, name)
