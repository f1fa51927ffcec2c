"""onboard-py: the seed case in Python. Sends a user's welcome email
exactly once, however often the job runs; the twin of the Rust ``onboard``
(tasks/onboard), with the same payload, result and error kinds.

The email goes out inside a step keyed by the user
(``welcome-email:<user_id>``). A retry, a redelivery after a worker crash
or a second job for the same user finds the step done: the mail API is not
called again and the recorded output is returned. One window is left: a
worker killed after the POST but before the step was recorded. For that the
POST carries the step's idempotency token (the same on every delivery): the
host adds it as the ``Idempotency-Key`` header to every request made inside
a step, and the body repeats it for APIs that read it there. A mail API
that honours it sends the email once.

With ``"db": "app"`` in the payload it is the article's task: in one
transaction it locks the user's row (``SELECT ... FOR UPDATE``), returns if
``onboarded`` is already true, sends the email inside the step, sets
``onboarded = true`` and commits. The row lock makes concurrent jobs for one
user wait for each other; the step is still needed because the transaction
can roll back *after* the email went out (the commit fails, the worker
dies, the job times out): the next run finds the row not onboarded but the
step done, and does not send again.

Errors: connection failures and timeouts leave ``wasmq.http`` as
``ConnectionError``/``Timeout``, which the SDK maps to kind ``network``; a
mail API answering with an error status fails with kind ``mail-api``. The
task's policy lists both among its auto-retry kinds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from wasmq import Fail, Job, http, once, postgres, step_token, task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Args:
    """The payload: ``{"user_id": 42, "mail_api": "http://...", "db": "app"}``."""

    user_id: int
    #: URL the welcome email is POSTed to.
    mail_api: str
    #: Database (granted in the task's policy) whose ``users`` table has the
    #: user's ``onboarded`` flag; without one, the email alone.
    db: Optional[str] = None

    @staticmethod
    def parse(payload: Any) -> "Args":
        """The payload checked as the Rust twin's serde would: a bad one
        fails with kind ``bad-payload``, never retried."""
        if not isinstance(payload, dict):
            raise Fail("bad-payload", f"expected an object, got {payload!r}")
        user_id = payload.get("user_id")
        mail_api = payload.get("mail_api")
        db = payload.get("db")
        if not isinstance(user_id, int) or isinstance(user_id, bool) or user_id < 0:
            raise Fail("bad-payload", f"user_id: expected an unsigned integer, got {user_id!r}")
        if not isinstance(mail_api, str):
            raise Fail("bad-payload", f"mail_api: expected a string, got {mail_api!r}")
        if db is not None and not isinstance(db, str):
            raise Fail("bad-payload", f"db: expected a string, got {db!r}")
        return Args(user_id=user_id, mail_api=mail_api, db=db)


@task
def run(job: Job, payload: Any) -> dict[str, Any]:
    """Onboard one user: the email once, and with a database the flag."""
    args = Args.parse(payload)
    if args.db is None:
        return welcome(job, args)
    with postgres.connect(args.db) as conn:
        with conn.transaction():
            cur = conn.execute(
                "SELECT onboarded FROM users WHERE id = %s FOR UPDATE", (args.user_id,)
            )
            row = cur.fetchone()
            if row is None:
                raise Fail(f"no user {args.user_id}")
            if row[0] is True:
                # Leaving the block commits a transaction that changed
                # nothing: the row lock is released either way.
                log.info("user %d is already onboarded", args.user_id)
                return result(args.user_id, already_sent=True, sent_by_job="", status=0)
            out = welcome(job, args)
            conn.execute("UPDATE users SET onboarded = true WHERE id = %s", (args.user_id,))
    return out


def welcome(job: Job, args: Args) -> dict[str, Any]:
    """Send the welcome email once per user (the step)."""
    step = f"welcome-email:{args.user_id}"
    ran_here = False

    def send() -> dict[str, Any]:
        nonlocal ran_here
        ran_here = True
        body = {
            "to_user": args.user_id,
            "template": "welcome",
            "idempotency_key": step_token(step),
        }
        # ConnectionError and Timeout propagate: kind "network".
        resp = http.post(args.mail_api, json=body)
        if not 200 <= resp.status_code < 300:
            raise Fail(
                "mail-api", f"mail API answered {resp.status_code}: {resp.text}"
            )
        log.info("welcome email sent to user %d", args.user_id)
        return {"status": resp.status_code, "by_job": job.id}

    sent = once(step, send)
    if not ran_here:
        log.info(
            "welcome email to user %d was already sent by job %s; skipped",
            args.user_id,
            sent["by_job"],
        )
    return result(
        args.user_id, already_sent=not ran_here, sent_by_job=sent["by_job"], status=sent["status"]
    )


def result(user_id: int, *, already_sent: bool, sent_by_job: str, status: int) -> dict[str, Any]:
    """The result, field for field the Rust twin's ``Out``."""
    return {
        "user_id": user_id,
        "email": "sent",
        # True if an earlier run (this job's or another's) sent the email
        # and this run skipped it.
        "already_sent": already_sent,
        "sent_by_job": sent_by_job,
        "mail_api_status": status,
    }
