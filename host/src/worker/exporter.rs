//! `GET /metrics` for a worker process (`wasmq worker --metrics ADDR`):
//! the process's [`Metrics`], with the gauges that describe the present
//! read at scrape time: each served queue's depth by state and the age of
//! its oldest ready job (one cheap script per queue, see
//! `Broker::queue`), and each pool's busy and total slots.
//!
//! Several workers serving one queue report the same queue figures; sum
//! or max them in PromQL with `max by (tenant, queue, state)`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::metrics::{Metrics, CONTENT_TYPE};
use crate::pools::PoolKind;

use super::manager::Worker;

/// What a scrape reads.
struct Scrape {
    broker: Broker,
    metrics: Arc<Metrics>,
    pools: Vec<(Arc<Worker>, PoolKind)>,
}

/// Listen on `addr` (before any job is fetched, so a taken port fails
/// the start; the error names the address).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics {addr}: cannot listen there"))?;
    tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
    Ok(listener)
}

/// Serve `/metrics` on `listener`, forever.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    metrics: Arc<Metrics>,
    pools: Vec<(Arc<Worker>, PoolKind)>,
) {
    let scrape = Arc::new(Scrape {
        broker,
        metrics,
        pools,
    });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let scrape = scrape.clone();
                async move { Ok::<_, std::convert::Infallible>(scrape.answer(request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

impl Scrape {
    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET || request.uri().path() != "/metrics" {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "only GET /metrics here\n",
            );
        }
        self.refresh().await;
        reply(StatusCode::OK, CONTENT_TYPE, self.metrics.render())
    }

    /// Set the gauges that describe the present.
    async fn refresh(&self) {
        let m = &self.metrics;
        let mut served = BTreeSet::new();
        for (pool, kind) in &self.pools {
            let labels = [pool.id(), kind.as_str()];
            m.pool_slots
                .with_label_values(&labels)
                .set(pool.config().concurrency as i64);
            m.pool_busy
                .with_label_values(&labels)
                .set(pool.busy() as i64);
            for tenant in &pool.config().tenants {
                for queue in &pool.config().queues {
                    served.insert((tenant.clone(), queue.clone()));
                }
            }
        }
        for (tenant, queue) in served {
            match self.broker.queue(&tenant, &queue).await {
                Ok(view) => {
                    for (state, n) in [
                        ("ready", view.ready),
                        ("delayed", view.delayed),
                        ("running", view.running),
                        ("dead", view.dead),
                        ("waiting", view.waiting),
                    ] {
                        m.queue_jobs
                            .with_label_values(&[&tenant, &queue, state])
                            .set(n as i64);
                    }
                    m.queue_oldest_seconds
                        .with_label_values(&[&tenant, &queue])
                        .set(view.oldest_ready_age_ms.unwrap_or(0) as f64 / 1000.0);
                }
                Err(e) => {
                    tracing::warn!(error = %e, %tenant, %queue, "reading queue figures for metrics failed")
                }
            }
        }
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
