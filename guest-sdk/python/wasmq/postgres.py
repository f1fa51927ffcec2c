"""PostgreSQL, DB-API style, by a database name the task's policy grants
(``databases = ["app"]`` under ``[sandbox]``; the URL is the tenant's secret
``database:app`` and never reaches the task).

::

    with postgres.connect("app") as conn:
        with conn.transaction():
            cur = conn.execute("SELECT onboarded FROM users WHERE id = %s FOR UPDATE", (user_id,))
            row = cur.fetchone()
            if row and not row[0]:
                conn.execute("UPDATE users SET onboarded = true WHERE id = $1", [user_id])

Placeholders are ``%s`` (psycopg style; ``%%`` is then a literal ``%``),
``%(name)s`` with a dict of parameters, or PostgreSQL's own ``$1``, ``$2``.
Parameters always travel apart from the SQL: nothing is spliced into it.
Outside :meth:`Connection.transaction` each statement stands alone
(autocommit). Values: ``None``, ``bool``, ``int``, ``float``, ``str``,
``bytes`` and ``dict``/``list`` (sent as JSON); columns come back the same
way (json/jsonb decoded). A transaction still open when the job ends is
rolled back by the host. Failed calls raise :class:`wasmq.HostError`
subclasses (a SQL error is :class:`wasmq.Invalid`).
"""

from __future__ import annotations

import contextlib
import json
import re
from types import TracebackType
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

from wit_world.imports import postgres as wit

from .errors import host_call

__all__ = ["connect", "Connection", "Cursor", "Params"]

#: Statement parameters: a sequence for ``%s`` / ``$n``, a mapping for ``%(name)s``.
Params = Union[Sequence[Any], Mapping[str, Any]]

# `%%`, `%s` or `%(name)s`: the psycopg placeholders.
_PERCENT = re.compile(r"%%|%s|%\((\w+)\)s")
# First keyword of a statement that returns rows (after comments and parentheses).
_ROWS_FIRST = {"select", "with", "values", "show", "table", "explain", "fetch"}
_RETURNING = re.compile(r"\breturning\b", re.IGNORECASE)
_LEADING = re.compile(r"^(?:\s+|--[^\n]*\n?|/\*.*?\*/|\()*", re.DOTALL)


def to_value(v: Any) -> wit.Value:
    """The WIT value of a Python parameter."""
    if v is None:
        return wit.Value_Null()
    if isinstance(v, bool):
        return wit.Value_Boolean(v)
    if isinstance(v, int):
        return wit.Value_Int64(v)
    if isinstance(v, float):
        return wit.Value_Float64(v)
    if isinstance(v, str):
        return wit.Value_Text(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return wit.Value_Bytes(bytes(v))
    if isinstance(v, (dict, list)):
        return wit.Value_Json(json.dumps(v, separators=(",", ":")))
    raise TypeError(
        f"a postgres parameter is None, bool, int, float, str, bytes, dict or list, not "
        f"{type(v).__name__} (pass str(value) and cast it in SQL, e.g. $1::timestamptz)"
    )


def from_value(v: wit.Value) -> Any:
    """The Python value of a WIT column value."""
    if isinstance(v, wit.Value_Null):
        return None
    if isinstance(v, wit.Value_Json):
        return json.loads(v.value)
    return v.value


def convert(sql: str, params: Optional[Params]) -> Tuple[str, List[wit.Value]]:
    """``sql`` with psycopg placeholders turned into ``$n``, and the
    parameters as WIT values. SQL without ``%s``/``%(name)s`` goes as is
    (``$n`` placeholders, or none)."""
    if params is None:
        params = ()
    if isinstance(params, Mapping):
        names: List[str] = []

        def named(m: "re.Match[str]") -> str:
            if m.group(0) == "%%":
                return "%"
            name = m.group(1)
            if name is None:
                raise ValueError("%s in a statement whose parameters are a dict: use %(name)s")
            if name not in params:
                raise KeyError(f"statement parameter {name!r} not given")
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        if "%(" not in sql:
            raise ValueError("parameters given as a dict need %(name)s placeholders")
        sql = _PERCENT.sub(named, sql)
        return sql, [to_value(params[n]) for n in names]
    values = list(params)
    if not any(m.group(0) == "%s" for m in _PERCENT.finditer(sql)):
        return sql, [to_value(v) for v in values]
    count = 0

    def positional(m: "re.Match[str]") -> str:
        nonlocal count
        if m.group(0) == "%%":
            return "%"
        if m.group(1) is not None:
            raise ValueError("%(name)s placeholders need parameters given as a dict")
        count += 1
        return f"${count}"

    sql = _PERCENT.sub(positional, sql)
    if count != len(values):
        raise ValueError(f"the statement has {count} %s placeholders but {len(values)} parameters")
    return sql, [to_value(v) for v in values]


def returns_rows(sql: str) -> bool:
    """Whether ``sql`` returns rows (a query) rather than a row count."""
    rest = _LEADING.sub("", sql, count=1)
    first = re.match(r"[A-Za-z]+", rest)
    if first and first.group(0).lower() in _ROWS_FIRST:
        return True
    return bool(_RETURNING.search(sql))


class Cursor:
    """The result of one statement at a time (DB-API-like)."""

    #: Rows :meth:`fetchmany` returns by default.
    arraysize: int = 1

    def __init__(self, conn: "Connection") -> None:
        self.connection = conn
        self._rows: List[Tuple[Any, ...]] = []
        self._next = 0
        #: Rows returned (a query) or changed (any other statement); -1 before any.
        self.rowcount: int = -1
        #: One 7-tuple per column (name first, the rest None) after a query; else None.
        self.description: Optional[List[Tuple[Any, ...]]] = None

    def execute(self, sql: str, params: Optional[Params] = None) -> "Cursor":
        """Run one statement with ``params``; returns the cursor."""
        text, values = convert(sql, params)
        raw = self.connection._raw()
        self._next = 0
        if returns_rows(text):
            result = host_call(raw.query, text, values)
            self.description = [(c, None, None, None, None, None, None) for c in result.columns]
            self._rows = [tuple(from_value(v) for v in row) for row in result.rows]
            self.rowcount = len(self._rows)
        else:
            self.description = None
            self._rows = []
            self.rowcount = host_call(raw.execute, text, values)
        return self

    def executemany(self, sql: str, seq_of_params: Sequence[Params]) -> "Cursor":
        """Run ``sql`` once per parameter set; ``rowcount`` is the total."""
        total = 0
        for params in seq_of_params:
            self.execute(sql, params)
            total += max(self.rowcount, 0)
        self.rowcount = total
        return self

    def fetchone(self) -> Optional[Tuple[Any, ...]]:
        """The next row, or ``None`` when none is left."""
        if self._next >= len(self._rows):
            return None
        row = self._rows[self._next]
        self._next += 1
        return row

    def fetchmany(self, size: Optional[int] = None) -> List[Tuple[Any, ...]]:
        """Up to ``size`` (default :attr:`arraysize`) next rows."""
        n = self.arraysize if size is None else size
        rows = self._rows[self._next : self._next + n]
        self._next += len(rows)
        return rows

    def fetchall(self) -> List[Tuple[Any, ...]]:
        """Every row left."""
        rows = self._rows[self._next :]
        self._next = len(self._rows)
        return rows

    def close(self) -> None:
        """Forget the rows (nothing is held on the host)."""
        self._rows = []
        self._next = 0

    def __iter__(self) -> Iterator[Tuple[Any, ...]]:
        while (row := self.fetchone()) is not None:
            yield row

    def __enter__(self) -> "Cursor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Connection:
    """One connection from the worker's pool for this job (handed back on
    :meth:`close`, at the end of a ``with`` block, or when the job ends)."""

    def __init__(self, raw: wit.Connection, name: str) -> None:
        self._conn: Optional[wit.Connection] = raw
        self._in_transaction = False
        #: The database name the policy granted.
        self.name = name

    def _raw(self) -> wit.Connection:
        if self._conn is None:
            raise RuntimeError(f"connection to database {self.name!r} is closed")
        return self._conn

    def cursor(self) -> Cursor:
        """A new cursor on this connection."""
        return Cursor(self)

    def execute(self, sql: str, params: Optional[Params] = None) -> Cursor:
        """Run one statement on a new cursor; the cursor."""
        return self.cursor().execute(sql, params)

    @contextlib.contextmanager
    def transaction(self) -> Iterator["Connection"]:
        """``with conn.transaction():`` BEGIN; COMMIT when the block ends,
        ROLLBACK (and the exception goes on) when it raises."""
        if self._in_transaction:
            raise RuntimeError("a transaction is already open on this connection")
        raw = self._raw()
        host_call(raw.begin)
        self._in_transaction = True
        try:
            yield self
        except BaseException:
            self._in_transaction = False
            try:
                host_call(raw.rollback)
            except Exception:  # the host rolls back anyway when the job ends
                pass
            raise
        self._in_transaction = False
        host_call(raw.commit)

    def close(self) -> None:
        """Hand the connection back to the pool (an open transaction is
        rolled back by the host)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.__exit__(None, None, None)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


def connect(name: str) -> Connection:
    """Open database ``name``; :class:`wasmq.Denied` unless the policy
    grants it."""
    return Connection(host_call(wit.Connection.open, name), name)
