/**
 * hello-js: a wasmq task in JavaScript, built with componentize-js against
 * wit/task.wit (world `task`).
 *
 * Payload `{"name": "Ada"}`. Counts the distinct names the tenant has
 * greeted with the host counter `names-greeted`, bumped by
 * `counter.incr-once` once per name (one atomic host operation, so a
 * retry, a redelivery or a second job for the same name counts it once),
 * writes a log line, and returns `{"greeting": "hello Ada", "greeted": N}`.
 *
 * Errors: a payload that is not a JSON object with a non-empty string
 * `name` fails with kind "bad-payload"; a host call the host refuses (a
 * name over its 512-byte limit is `invalid`) fails the job, one the host
 * could not serve (`unavailable`) asks for a retry.
 */

import { write } from 'wasmq:task/log@0.1.0';
import { incrOnce } from 'wasmq:task/counter@0.1.0';

/** The tenant-wide count of distinct names greeted. */
const COUNTER = 'names-greeted';

/**
 * The world `task`'s one export. The string returned is the job's `ok`
 * result; a `task-error` value thrown (`{tag, val}`) is its `err`.
 */
export function run(job, payload) {
  const name = parseName(payload);

  // s64 arguments and results are BigInts in the JS bindings. A host call
  // that returns `err` throws an Error whose `payload` is the `host-error`.
  let greeted;
  try {
    greeted = incrOnce(COUNTER, 1n, `name:${name}`);
  } catch (e) {
    throw hostFailure('counter.incr-once', e);
  }

  write('info', `greeted ${name}; ${greeted} distinct names so far (attempt ${job.attempt})`);
  return JSON.stringify({ greeting: `hello ${name}`, greeted: Number(greeted) });
}

/**
 * The payload's `name`, or a thrown "bad-payload" error. The host hands a
 * task only valid JSON (it refuses anything else as bad-payload itself).
 */
function parseName(payload) {
  const value = JSON.parse(payload);
  const name = value !== null && typeof value === 'object' ? value.name : undefined;
  if (typeof name !== 'string' || name.length === 0) {
    throw badPayload('expected {"name": "..."} with a non-empty string name');
  }
  return name;
}

/** A `task-error::kind` the host reports as the bad-payload category. */
function badPayload(message) {
  return { tag: 'kind', val: { kind: 'bad-payload', message } };
}

/**
 * A failed host call as a `task-error`: `unavailable` is the host's fault
 * and may pass, so retry; `denied` and `invalid` fail the same way again,
 * so fail the job.
 */
function hostFailure(call, e) {
  const err = e && e.payload;
  if (err && err.tag === 'unavailable') {
    return { tag: 'retry', val: { message: `${call}: ${err.val}`, delayMs: undefined } };
  }
  const why = err ? `${err.tag}: ${err.val}` : String(e);
  return { tag: 'fail', val: `${call} ${why}` };
}
