""":class:`Lock`: tenant-scoped distributed locks with a lease and a
fencing token.

A lock is a *lease*: it expires after its TTL unless renewed, so a job that
dies never blocks others forever. A holder can therefore lose the lock
without noticing (paused, slow) while another job takes it; pass the
:attr:`Lease.fencing_token` with every write to the protected resource and
have it refuse writes carrying a lower token than the highest it accepted.
"""

from __future__ import annotations

from types import TracebackType
from typing import Optional, Type

from wit_world.imports import lock as wit

from .errors import Duration, LockBusy, host_call, to_millis

__all__ = ["Lock", "Lease"]


class Lease:
    """A lock held by this job (what ``with Lock(...) as lease`` binds)."""

    def __init__(self, lease: wit.Lease) -> None:
        self._lease = lease
        self.released = False

    @property
    def name(self) -> str:
        """Name of the lock."""
        return self._lease.name

    @property
    def fencing_token(self) -> int:
        """Strictly increasing per lock name across all holders."""
        return self._lease.fencing_token

    def renew(self, ttl: Duration) -> bool:
        """Extend the lease to ``ttl`` from now. False if the lease was
        already lost: stop working on the protected resource."""
        return host_call(wit.renew, self._lease, to_millis(ttl))

    def release(self) -> bool:
        """Release the lock now. False if the lease was already lost (a lost
        lease never releases another holder's lock)."""
        if self.released:
            return False
        self.released = True
        return host_call(wit.release, self._lease)


class Lock:
    """``with Lock(name, ttl=30, wait=None) as lease:`` holds lock ``name``
    for the block.

    Acquires for ``ttl`` seconds (or a timedelta), waiting up to ``wait``
    for the current holder (the wait happens on the host and costs no
    fuel). Not acquired: raises :class:`wasmq.LockBusy`, a :class:`Retry`,
    so left uncaught the job is retried. Released when the block ends
    (errors releasing are ignored: the lease expires anyway).
    """

    def __init__(self, name: str, ttl: Duration = 30, wait: Optional[Duration] = None) -> None:
        self.name = name
        self.ttl = ttl
        self.wait = wait
        self.lease: Optional[Lease] = None

    def acquire(self) -> Optional[Lease]:
        """Try to take the lock; the lease, or ``None`` if another holder
        kept it (for use without ``with``; call ``lease.release()``)."""
        lease = host_call(wit.acquire, self.name, to_millis(self.ttl), to_millis(self.wait))
        return None if lease is None else Lease(lease)

    def __enter__(self) -> Lease:
        lease = self.acquire()
        if lease is None:
            raise LockBusy(message=f"lock {self.name} is held by another job")
        self.lease = lease
        return lease

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        lease, self.lease = self.lease, None
        if lease is not None and not lease.released:
            try:
                lease.release()
            except Exception:  # best effort: the lease expires after its TTL
                pass
