//! OpenTelemetry export: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, `wasmq
//! enqueue` and `wasmq worker` processes post their spans over OTLP/HTTP
//! (protobuf) to a receiver in this test, which decodes them with the
//! OpenTelemetry proto types. The producer's span is the child of the
//! `--traceparent` it was given, the worker's run span is the child of the
//! producer's, the run's fetch, HTTP request and record spans are its
//! children, and the guest's request carries the request span's id.

mod common;

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::json;
use wasmq::policy::TaskPolicy;

use common::http::{Reply, TestServer};
use common::jobs::redis_with_task;
use common::workers::KillOnDrop;
use common::{text, wasmq_bin};

const TENANT: &str = "traced";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Exported {
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
    service: String,
}

/// Every span the receiver was sent, decoded.
fn exported(receiver: &TestServer) -> Vec<Exported> {
    let mut spans = Vec::new();
    for request in receiver.requests() {
        assert_eq!(request.path, "/v1/traces", "OTLP/HTTP traces path");
        assert_eq!(
            request.header("content-type"),
            Some("application/x-protobuf"),
            "protobuf body"
        );
        let batch = ExportTraceServiceRequest::decode(request.body.as_slice())
            .expect("an ExportTraceServiceRequest");
        for resource in batch.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| value(a.value.as_ref()))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Exported {
                        name: span.name,
                        kind: span.kind,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), value(a.value.as_ref())))
                            .collect(),
                        service: service.clone(),
                    });
                }
            }
        }
    }
    spans
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// `wasmq ARGS...` with spans exported to `collector`.
fn wasmq_traced(redis: &str, collector: &str, args: &[&str]) -> Output {
    Command::new(wasmq_bin())
        .args(["--redis", redis, "--tenant", TENANT])
        .args(args)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
        .env("WASMQ_CACHE_DIR", common::shared_cache_dir())
        .output()
        .unwrap()
}

/// The one span named `name` whose attribute `key` is `value`.
fn span_with<'a>(spans: &'a [Exported], name: &str, key: &str, value: &str) -> &'a Exported {
    let found: Vec<&Exported> = spans
        .iter()
        .filter(|s| s.name == name && s.attributes.get(key).map(String::as_str) == Some(value))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {name} span with {key}={value}: {spans:#?}"
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_and_worker_spans_form_one_trace_with_the_guests_request() {
    let receiver = TestServer::start(|_, _| Reply::ok("")).await;
    let collector = format!("http://{}", receiver.authority());
    let site = TestServer::start(|_, _| Reply::ok("ok")).await;
    let mut policy = TaskPolicy::default();
    policy.sandbox.allow_http = vec![site.authority()];
    let (redis, broker) = redis_with_task(TENANT, "hostile", "hostile", &policy).await;

    let worker = KillOnDrop(
        Command::new(wasmq_bin())
            .args(["--redis", &redis.url, "--tenant", TENANT, "worker"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector)
            // Batches go out every 100 ms rather than every 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("WASMQ_CACHE_DIR", common::shared_cache_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let caller = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let payload = json!({"mode": "http", "url": site.url("/traced")}).to_string();
    let enqueued = wasmq_traced(
        &redis.url,
        &collector,
        &["enqueue", "hostile", &payload, "--traceparent", &caller],
    );
    assert!(enqueued.status.success(), "{}", text(&enqueued.stderr));
    let id = text(&enqueued.stdout);
    // A job enqueued with no trace context starts a trace of its own.
    let plain_payload = json!({"mode": "http", "url": site.url("/plain")}).to_string();
    let plain = wasmq_traced(
        &redis.url,
        &collector,
        &["enqueue", "hostile", &plain_payload],
    );
    assert!(plain.status.success(), "{}", text(&plain.stderr));
    let plain_id = text(&plain.stdout);

    // A job making host calls: each is a span under its run.
    let locked_payload = json!({"mode": "locked-incr", "key": "secret-key-name"}).to_string();
    let locked = wasmq_traced(
        &redis.url,
        &collector,
        &["enqueue", "hostile", &locked_payload],
    );
    assert!(locked.status.success(), "{}", text(&locked.stderr));
    let locked_id = text(&locked.stdout);

    // The producer's span was flushed when `wasmq enqueue` exited; the
    // worker's go out in its next batches.
    let started = Instant::now();
    let spans = loop {
        let spans = exported(&receiver);
        let runs = spans.iter().filter(|s| s.name == "run").count();
        let records = spans.iter().filter(|s| s.name == "record").count();
        if runs >= 3 && records >= 3 {
            break spans;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the worker's spans arrive: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for id in [&id, &plain_id, &locked_id] {
        let status = broker.status(TENANT, id).await.unwrap().unwrap();
        assert_eq!(status.state, "succeeded", "{id}");
    }

    // The producer's span: a child of the caller's, in its trace.
    let enqueue = span_with(&spans, "enqueue", "messaging.message.id", &id);
    assert_eq!(enqueue.kind, SpanKind::Producer as i32);
    assert_eq!(
        (enqueue.trace_id.as_str(), enqueue.parent_span_id.as_str()),
        (TRACE_ID, CALLER_SPAN)
    );
    assert_eq!(enqueue.service, "wasmq");
    assert_eq!(enqueue.attributes["wasmq.task"], "hostile");

    // The worker's run span: the producer's child.
    let run = span_with(&spans, "run", "messaging.message.id", &id);
    assert_eq!(run.kind, SpanKind::Consumer as i32);
    assert_eq!(run.trace_id, TRACE_ID);
    assert_eq!(
        run.parent_span_id, enqueue.span_id,
        "run is the producer's child"
    );
    assert_eq!(run.attributes["wasmq.task"], "hostile");
    assert_eq!(run.attributes["wasmq.outcome"], "succeeded");
    assert_eq!(run.attributes["wasmq.tenant"], TENANT);

    // Its fetch, HTTP request and record spans hang under it.
    let children = |name: &str| -> Vec<&Exported> {
        spans
            .iter()
            .filter(|s| s.name == name && s.parent_span_id == run.span_id)
            .collect()
    };
    assert_eq!(children("fetch").len(), 1, "{spans:#?}");
    assert_eq!(children("record").len(), 1, "{spans:#?}");
    let requests = children("http.request");
    assert_eq!(requests.len(), 1, "{spans:#?}");
    let request_span = requests[0];
    assert_eq!(request_span.kind, SpanKind::Client as i32);
    assert_eq!(request_span.trace_id, TRACE_ID);
    assert_eq!(request_span.attributes["http.response.status_code"], "200");

    // The guest's request carried the request span as its parent.
    let sent = site.requests();
    let traced = sent.iter().find(|r| r.path == "/traced").unwrap();
    assert_eq!(
        traced.header("traceparent"),
        Some(format!("00-{TRACE_ID}-{}-01", request_span.span_id).as_str())
    );

    // The job enqueued without context: a new trace, rooted at its
    // producer's span, which its run is the child of.
    let plain_enqueue = span_with(&spans, "enqueue", "messaging.message.id", &plain_id);
    assert_eq!(plain_enqueue.parent_span_id, "", "a root span");
    assert_ne!(plain_enqueue.trace_id, TRACE_ID);
    let plain_run = span_with(&spans, "run", "messaging.message.id", &plain_id);
    assert_eq!(plain_run.parent_span_id, plain_enqueue.span_id);
    assert_eq!(plain_run.trace_id, plain_enqueue.trace_id);
    let plain_request = sent.iter().find(|r| r.path == "/plain").unwrap();
    let header = plain_request.header("traceparent").expect("a traceparent");
    assert!(
        header.starts_with(&format!("00-{}-", plain_run.trace_id)),
        "{header}"
    );

    let locked_run = span_with(&spans, "run", "messaging.message.id", &locked_id);
    let mut calls: Vec<&str> = spans
        .iter()
        .filter(|s| s.parent_span_id == locked_run.span_id)
        .map(|s| s.name.as_str())
        .filter(|name| !["fetch", "record"].contains(name))
        .collect();
    calls.sort();
    calls.dedup();
    assert_eq!(
        calls,
        ["kv.get", "kv.set", "lock.acquire", "lock.release"],
        "{spans:#?}"
    );

    // No span carries the job's payload or a name the guest chose.
    for span in &spans {
        for value in span.attributes.values() {
            assert!(
                !value.contains("/traced") && !value.contains("secret-key-name"),
                "{span:?}"
            );
        }
    }
    drop(worker);
}

/// A protocol wasmq does not speak is refused with a warning naming it,
/// and the command still does its work; without a collector nothing is
/// sent anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_otlp_protocol_is_named_and_the_command_still_works() {
    let receiver = TestServer::start(|_, _| Reply::ok("")).await;
    let collector = format!("http://{}", receiver.authority());
    let (redis, _broker) =
        redis_with_task(TENANT, "hostile", "hostile", &TaskPolicy::default()).await;
    let grpc = Command::new(wasmq_bin())
        .args(["--redis", &redis.url, "--tenant", TENANT])
        .args(["enqueue", "hostile", "{}"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .unwrap();
    assert!(grpc.status.success(), "{}", text(&grpc.stderr));
    let stderr = text(&grpc.stderr);
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && stderr.contains("http/protobuf"),
        "{stderr}"
    );
    let plain = common::wasmq(&redis.url, TENANT, &["enqueue", "hostile", "{}"]);
    assert!(plain.status.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.requests().is_empty(), "nothing exported");
}
