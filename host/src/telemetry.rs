//! Logs and traces for a `wasmq` process: the `tracing` subscriber (logs
//! on stderr, text or JSON) and, when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, an OpenTelemetry layer that exports wasmq's spans over OTLP/HTTP
//! with protobuf bodies.
//!
//! The two layers filter apart. Logs keep `WASMQ_LOG` (warnings and the
//! launcher's lines by default). Spans are `debug` level: without a
//! collector nothing enables them, so a job pays a disabled callsite check
//! per span and no more; with one, wasmq's spans (and `info`+ events inside
//! them, as span events) go to the collector whatever `WASMQ_LOG` says.
//!
//! Spans are batched on the SDK's own thread; each batch is posted by
//! [`OtlpHttp`] on the process's runtime, so no second HTTP or TLS stack is
//! built. A process ends by flushing what is still batched ([`Telemetry`]'s
//! `shutdown`), so a short `wasmq enqueue` exports its span too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// What `WASMQ_LOG` is when unset: warnings, and the lines an operator
/// watches a worker by.
const DEFAULT_LOG_FILTER: &str =
    "warn,wasmq::launcher=info,wasmq::worker::presence=info,wasmq::worker::exporter=info";

/// The name spans are exported under unless `OTEL_SERVICE_NAME` (or
/// `service.name` in `OTEL_RESOURCE_ATTRIBUTES`) says otherwise.
const SERVICE_NAME: &str = "wasmq";

/// How long one export may take before it is given up (the SDK's batch
/// thread waits on it).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest collector reply read (they are a few bytes; an error page may
/// be more).
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Whether spans are being exported (set once, at start).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans: callers skip work that only a
/// collector would see.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The process's telemetry; `shutdown` before exit flushes spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flush spans still batched and stop the exporter (a no-op without a
    /// collector). Call it while the runtime given to [`init`] still runs.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: flushing spans to the collector failed: {e}");
            }
        }
    }
}

/// Install the process's subscriber: logs on stderr as JSON lines or text
/// (`ansi`: with colour codes), and span export when a collector is
/// configured (its batches are posted on `runtime`). A collector that is
/// configured but cannot be used is reported on stderr; logging goes on
/// without it.
pub fn init(json: bool, ansi: bool, runtime: tokio::runtime::Handle) -> Telemetry {
    let log_filter = tracing_subscriber::EnvFilter::try_from_env("WASMQ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if json {
        logs.json().with_filter(log_filter).boxed()
    } else {
        logs.with_ansi(ansi).with_filter(log_filter).boxed()
    };
    let (provider, problem) = match collector_configured() {
        Ok(true) => match provider(runtime) {
            Ok(provider) => (Some(provider), None),
            Err(e) => (None, Some(e)),
        },
        Ok(false) => (None, None),
        Err(e) => (None, Some(e)),
    };
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(SERVICE_NAME))
            .with_filter(
                tracing_subscriber::filter::filter_fn(|meta| {
                    meta.target().starts_with("wasmq")
                        && (meta.is_span() || *meta.level() <= tracing::Level::INFO)
                })
                // Trace-level callsites stay disabled outright.
                .with_max_level_hint(tracing::Level::DEBUG),
            )
    });
    tracing_subscriber::registry().with(logs).with(spans).init();
    if let Some(problem) = problem {
        tracing::warn!(%problem, "not exporting spans");
    }
    if let Some(provider) = &provider {
        opentelemetry::global::set_tracer_provider(provider.clone());
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Telemetry { provider }
}

/// Whether the environment asks for span export over a protocol we speak.
fn collector_configured() -> Result<bool, String> {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none")
    {
        return Ok(false);
    }
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(false);
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Ok(protocol) = std::env::var(name) {
            if protocol.trim() != "http/protobuf" {
                return Err(format!(
                    "{name}={protocol:?}: wasmq exports OTLP over HTTP with protobuf bodies \
                     (http/protobuf); point it at the collector's HTTP port (4318)"
                ));
            }
            break;
        }
    }
    Ok(true)
}

/// The tracer provider: OTLP/HTTP from the standard environment variables
/// (endpoint, headers, timeout, compression), batched.
fn provider(runtime: tokio::runtime::Handle) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(OtlpHttp { runtime })
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("configuring the OTLP exporter: {e}"))?;
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !named {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The exporter's HTTP client: each export is one request on a fresh
/// connection (batches go every few seconds), made on the process's
/// runtime and awaited from the SDK's batch thread.
#[derive(Debug)]
struct OtlpHttp {
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttp {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        // Built inside the task: the timer needs the runtime, and this
        // thread (the SDK's) has none.
        let sent = self
            .runtime
            .spawn(async move { tokio::time::timeout(EXPORT_TIMEOUT, post(request)).await });
        match sent.await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(format!("no reply within {EXPORT_TIMEOUT:?}").into()),
            Err(e) => Err(format!("the export task stopped: {e}").into()),
        }
    }
}

/// Send `request` to its URI (http or https) and read the reply.
async fn post(
    request: http::Request<Bytes>,
) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
    let uri = request.uri().clone();
    let host = uri
        .host()
        .ok_or_else(|| format!("the collector URL {uri} names no host"))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let (parts, body) = request.into_parts();
    let mut request = http::Request::from_parts(parts, Full::new(body));
    if !request.headers().contains_key(http::header::HOST) {
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or(&host);
        request
            .headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_str(authority)?);
    }
    // HTTP/1 sends the path, not the whole URI.
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    *request.uri_mut() = path.parse()?;
    let response = if https {
        let name = rustls::pki_types::ServerName::try_from(host.clone())?;
        let tls = crate::tls::connector().connect(name, tcp).await?;
        send(hyper_util::rt::TokioIo::new(tls), request).await?
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), request).await?
    };
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_REPLY_BYTES)
        .collect()
        .await?
        .to_bytes();
    Ok(http::Response::from_parts(parts, body))
}

/// One HTTP/1 exchange on `io`.
async fn send<T>(
    io: T,
    request: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, opentelemetry_http::HttpError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender.send_request(request).await?)
}
