"""Logging to the job's log on the host.

:func:`wasmq.task` installs :class:`HostLogHandler` on the root logger, so
``logging.getLogger(__name__).info(...)`` anywhere in the task lands in the
job's log (bounded by the host). Levels map DEBUG -> debug, INFO -> info,
WARNING -> warn, ERROR and CRITICAL -> error. The root logger is set to
DEBUG when it was left at Python's default, so every level is kept, as the
Rust SDK's ``log::debug`` is; raise it to quiet the task
(``logging.getLogger().setLevel(logging.INFO)``).
"""

from __future__ import annotations

import logging

from wit_world.imports import log as wit

__all__ = ["HostLogHandler", "install", "write"]


def level_of(levelno: int) -> wit.Level:
    """The host's level for a :mod:`logging` level number."""
    if levelno >= logging.ERROR:
        return wit.Level.ERROR
    if levelno >= logging.WARNING:
        return wit.Level.WARN
    if levelno >= logging.INFO:
        return wit.Level.INFO
    return wit.Level.DEBUG


def write(levelno: int, message: str) -> None:
    """Append ``message`` to the job's log at :mod:`logging` level ``levelno``."""
    wit.write(level_of(levelno), message)


class HostLogHandler(logging.Handler):
    """A :class:`logging.Handler` that appends each record to the job's log."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        """Send ``record``, formatted, to the host."""
        try:
            write(record.levelno, self.format(record))
        except Exception:
            self.handleError(record)


def install() -> None:
    """Put one :class:`HostLogHandler` on the root logger (idempotent)."""
    root = logging.getLogger()
    if any(isinstance(h, HostLogHandler) for h in root.handlers):
        return
    root.addHandler(HostLogHandler())
    if root.level == logging.WARNING:
        root.setLevel(logging.DEBUG)
