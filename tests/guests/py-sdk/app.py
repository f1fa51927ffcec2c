"""Test guest for the Python SDK (tests/python.rs): every wrapper, through
the op the payload names (``{"op": NAME, ...}``).

- ``kv``: set, get, set_json, get_json, set_if_absent (twice), delete
  (twice), get after delete; returns what each returned.
- ``counters``: ``incr_once(name, delta, once_key)`` then ``incr`` by 0 and
  ``get``.
- ``lock``: takes ``name``; inside, tries it again (must be busy), renews;
  after, takes it again; returns both fencing tokens.
- ``lock_uncaught``: takes ``name`` twice, the second left uncaught
  (``LockBusy`` -> retry).
- ``once``: step ``key`` that counts ``counter`` up and returns
  ``{"ran_in": job.id}``; raises ValueError inside when ``fail``.
- ``once_decorated``: the same through ``@once("greet:{user_id}")``.
- ``enqueue``: ``enqueue(task, payload, countdown=..., idempotency_key=...)``.
- ``flow``: starts ``chain(step(task, {"op": "echo", "value": 1}),
  step(task, {"op": "deps"}))``.
- ``echo``: returns ``value``; ``deps``: returns the dependencies and results.
- ``config``: ``config.get`` of each name, reversed (the host redacts
  secret values from results); a denied one reads "denied";
  ``config_uncaught``: reads ``name`` and lets Denied through.
- ``pg``: on database ``db``: inserts with %s, reads with $1 and %(name)s,
  a transaction that raises (rolled back), a committed one; cursor methods.
- ``http_get`` / ``http_post`` (inside step ``key`` when given) /
  ``http_uncaught`` (a GET left to fail).
- ``log``: one line per level.
- ``retry`` / ``fail`` / ``kind`` / ``raise`` / ``host_invalid``: the error mappings.
- ``wheel``: calls the bundled pure-Python requirement.
"""

import logging

from wasmq import (
    Denied,
    Fail,
    Job,
    Lock,
    LockBusy,
    Retry,
    config,
    counters,
    enqueue,
    flows,
    http,
    kv,
    once,
    postgres,
    step_token,
    task,
)

log = logging.getLogger(__name__)


def op_kv(job, p):
    k = p["key"]
    out = {}
    kv.set(k, b"\x00bytes")
    out["get"] = list(kv.get(k))
    kv.set_json(k + ":j", {"a": [1, 2]}, ttl=60)
    out["get_json"] = kv.get_json(k + ":j")
    out["absent_first"] = kv.set_if_absent(k + ":a", "one")
    out["absent_second"] = kv.set_if_absent(k + ":a", "two")
    out["absent_value"] = kv.get(k + ":a").decode()
    out["delete_first"] = kv.delete(k)
    out["delete_second"] = kv.delete(k)
    out["after_delete"] = kv.get(k)
    out["missing_json"] = kv.get_json(k + ":nothing")
    return out


def op_counters(job, p):
    once_value = counters.incr_once(p["name"], p["delta"], p["once_key"])
    return {"incr_once": once_value, "incr0": counters.incr(p["name"], 0), "get": counters.get(p["name"])}


def op_lock(job, p):
    with Lock(p["name"], ttl=30) as first:
        try:
            with Lock(p["name"], ttl=30):
                inner = "acquired"
        except LockBusy:
            inner = "busy"
        renewed = first.renew(30)
        token1 = first.fencing_token
    with Lock(p["name"], ttl=30, wait=0.2) as second:
        token2 = second.fencing_token
    return {"inner": inner, "renewed": renewed, "token1": token1, "token2": token2}


def op_lock_uncaught(job, p):
    with Lock(p["name"]):
        with Lock(p["name"]):
            return "unreachable"


def counted(p, job):
    def body():
        counters.incr(p["counter"], 1)
        if p.get("fail"):
            raise ValueError("failed inside the step")
        return {"ran_in": job.id}

    return body


def op_once(job, p):
    out = once(p["key"], counted(p, job))
    return {"out": out, "count": counters.get(p["counter"]), "token": step_token(p["key"])}


@once("greet:{user_id}")
def greet(user_id, counter, job_id):
    counters.incr(counter, 1)
    return {"greeted": user_id, "by": job_id}


def op_once_decorated(job, p):
    return {"out": greet(p["user_id"], p["counter"], job.id), "count": counters.get(p["counter"])}


def op_enqueue(job, p):
    return {"id": enqueue(p["task"], p["payload"], countdown=p.get("countdown"), idempotency_key=p.get("key"))}


def op_flow(job, p):
    node = flows.chain(
        flows.step(p["task"], {"op": "echo", "value": 1}),
        flows.group(flows.step(p["task"], {"op": "echo", "value": 2}), on_failure="continue"),
        flows.step(p["task"], {"op": "deps"}),
    )
    started = flows.start(node)
    return {"flow_id": started.flow_id, "job_ids": started.job_ids}


def op_echo(job, p):
    return p["value"]


def op_deps(job, p):
    deps = job.dependencies()
    return {
        "flow_id": job.flow_id,
        "deps": [{"task": d.task, "ok": d.ok, "result": d.result, "job_id": d.job_id} for d in deps],
        "results": job.results(),
    }


def op_config(job, p):
    out = {}
    for name in p["names"]:
        try:
            value = config.get(name)
            # Reversed: the host redacts a secret's value from results.
            out[name] = value[::-1] if value is not None else None
        except Denied:
            out[name] = "denied"
    return out


def op_config_uncaught(job, p):
    return {name: config.get(name) for name in p["names"]}


def op_pg(job, p):
    with postgres.connect(p.get("db", "app")) as conn:
        cur = conn.cursor()
        cur.execute("INSERT INTO items (id, name, score, data, meta) VALUES (%s, %s, %s, %s, %s)",
                    (1, "one", 1.5, b"\x01\x02", {"k": "v"}))
        inserted = cur.rowcount
        conn.execute("INSERT INTO items (id, name) VALUES ($1, $2)", [2, "100%"])
        rows = conn.execute("SELECT id, name, score, data, meta FROM items WHERE id = $1", [1]).fetchall()
        like = conn.execute("SELECT name FROM items WHERE name LIKE '%%\\%%' AND id = %s", (2,)).fetchone()
        named = conn.execute("SELECT %(a)s::int8 + %(b)s::int8 AS total, %(a)s::int8 AS a", {"a": 2, "b": 3})
        description = [d[0] for d in named.description]
        total = named.fetchone()
        try:
            with conn.transaction():
                conn.execute("UPDATE items SET name = %s WHERE id = %s", ("changed", 1))
                raise ValueError("roll it back")
        except ValueError:
            pass
        after_rollback = conn.execute("SELECT name FROM items WHERE id = 1").fetchone()[0]
        with conn.transaction():
            updated = conn.execute("UPDATE items SET name = %s WHERE id = %s", ("committed", 2)).rowcount
        many = conn.execute("SELECT id FROM items ORDER BY id")
        first = many.fetchmany(1)
        rest = many.fetchall()
        return {
            "inserted": inserted,
            "rows": [[r[0], r[1], r[2], list(r[3]), r[4]] for r in rows],
            "like": like[0],
            "named": {"description": description, "row": list(total)},
            "after_rollback": after_rollback,
            "updated": updated,
            "first": [list(r) for r in first],
            "rest": [list(r) for r in rest],
            "none_left": many.fetchone(),
        }


def op_http_get(job, p):
    r = http.get(p["url"], params={"q": "a b"}, headers={"X-Test": "yes"}, timeout=10)
    return {"status": r.status_code, "ok": r.ok, "json": r.json(), "ctype": r.headers["CONTENT-TYPE"], "url": r.url}


def op_http_post(job, p):
    def post():
        r = http.post(p["url"], json={"n": 1, "big": "x" * 10000})
        return {"status": r.status_code, "text": r.text}

    if p.get("key"):
        return {"out": once(p["key"], post), "token": step_token(p["key"])}
    return {"out": post()}


def op_http_status(job, p):
    r = http.get(p["url"])
    try:
        r.raise_for_status()
        return {"raised": False}
    except http.HTTPError as e:
        return {"raised": True, "status": e.response.status_code, "ok": r.ok}


def op_http_uncaught(job, p):
    http.get(p["url"])
    return "unreachable"


def op_http_denied_caught(job, p):
    try:
        http.get(p["url"])
    except Denied as e:
        return {"denied": True, "is_http": isinstance(e, http.RequestException)}
    return {"denied": False}


def op_log(job, p):
    log.debug("debug line %d", 1)
    log.info("info line %s", "two")
    log.warning("warn line")
    log.error("error line")
    return "logged"


def op_retry(job, p):
    raise Retry("busy", delay=5)


def op_fail(job, p):
    raise Fail("nope")


def op_kind(job, p):
    raise Fail("mail-api", "mail API down")


def op_kind_kw(job, p):
    raise Fail("rate limited", kind="rate-limited")


def op_raise(job, p):
    raise ValueError("boom")


def op_host_invalid(job, p):
    kv.get("")
    return "unreachable"


def op_wheel(job, p):
    import wasmq_test_helper

    return wasmq_test_helper.shout(p["text"])


def op_job(job, p):
    return {"id": job.id, "task": job.task, "tenant": job.tenant, "attempt": job.attempt,
            "max_attempts": job.max_attempts, "idempotency_key": job.idempotency_key,
            "flow_id": job.flow_id, "payload": p}


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


@task
def run(job: Job, payload):
    if payload is None:
        return {"payload": None}
    return OPS[payload["op"]](job, payload)
