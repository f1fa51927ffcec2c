//! Outbound HTTP policy against real compiled guests and real local servers:
//! names resolving to private addresses, redirects (each hop checked by the
//! host), the response-size cap, and a server that never answers.
//!
//! The per-job cap on requests in flight is unit-tested in
//! `host/src/sandbox/http.rs`: the SDK's client is blocking, so a guest built
//! with it never has two requests in flight.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::guest_bytes;
use common::http::{Reply, TestServer};
use common::sandbox::{failure, sandbox, success};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use wasmq::backend::memory::MemoryBackend;
use wasmq::failure::Category;
use wasmq::policy::SandboxPolicy;
use wasmq::sandbox::{JobOutcome, PreparedTask, Sandbox};

/// The hostile guest's `http` mode: GET `url`, return `{status, bytes}`.
async fn get(sb: &Sandbox, task: &PreparedTask, url: &str, policy: &SandboxPolicy) -> JobOutcome {
    let payload = json!({"mode": "http", "url": url}).to_string();
    let job = common::sandbox::job(&payload);
    sb.run(task, &job, policy, Arc::new(MemoryBackend::new()))
        .await
}

fn allow(entries: &[String]) -> SandboxPolicy {
    SandboxPolicy {
        allow_http: entries.to_vec(),
        timeout: Duration::from_secs(20),
        ..SandboxPolicy::default()
    }
}

/// A loopback server that answers each request with the raw bytes its
/// handler returns for the path, or never answers (`None`).
struct RawServer {
    addr: SocketAddr,
    /// Bytes read from all clients so far.
    received: Arc<AtomicU64>,
}

impl RawServer {
    async fn start(handler: impl Fn(&str) -> Option<Vec<u8>> + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(handler);
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (handler, counter) = (handler.clone(), counter.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                counter.fetch_add(n as u64, Ordering::Relaxed);
                                head.extend_from_slice(&buf[..n]);
                            }
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    match handler(&path) {
                        Some(reply) => {
                            let _ = sock.write_all(&reply).await;
                            let _ = sock.shutdown().await;
                        }
                        // Hold the connection open, silent, until the client
                        // goes away.
                        None => while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {},
                    }
                });
            }
        });
        RawServer { addr, received }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn redirect(location: &str) -> Option<Vec<u8>> {
    Some(
        format!(
            "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
        .into_bytes(),
    )
}

fn ok(body: &str) -> Option<Vec<u8>> {
    Some(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolving_to_private_addresses_need_an_explicit_grant() {
    let site = TestServer::start(|_, _| Reply::ok("hello")).await;
    let port = site.addr.port();
    let sb = sandbox();
    let hostile = sb.prepare(&guest_bytes("hostile")).unwrap();
    let by_name = format!("http://localhost:{port}/");

    // On the allow-list by name, but the name resolves to loopback.
    let named = allow(&[format!("localhost:{port}")]);
    let (category, message) = failure(&get(&sb, &hostile, &by_name, &named).await);
    assert_eq!(category, Category::Denied, "{message}");
    for needle in [
        &format!("localhost:{port}"),
        "loopback",
        "allow_private_networks",
    ] {
        assert!(
            message.contains(needle),
            "{message:?} should name {needle:?}"
        );
    }
    assert!(site.requests().is_empty(), "nothing reached the server");

    // An IP-literal entry grants exactly that address.
    let literal = allow(&[site.authority()]);
    let got = success(&get(&sb, &hostile, &site.url("/"), &literal).await);
    assert_eq!(got, json!({"status": 200, "bytes": 5}));

    // The policy flag lets names resolve to private addresses.
    let open = SandboxPolicy {
        allow_private_networks: true,
        ..named.clone()
    };
    let got = success(&get(&sb, &hostile, &by_name, &open).await);
    assert_eq!(got, json!({"status": 200, "bytes": 5}));
    assert_eq!(site.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_followed_and_every_hop_is_checked() {
    let elsewhere = TestServer::start(|_, _| Reply::ok("internal")).await;
    let other_port = elsewhere.addr.port();
    let to_other = elsewhere.url("/");
    let to_localhost = format!("http://localhost:{other_port}/");
    let site = RawServer::start(move |path| match path {
        "/to-self" => redirect("/final"),
        "/final" => ok("done"),
        "/to-other" => redirect(&to_other),
        "/to-localhost" => redirect(&to_localhost),
        "/loop" => redirect("/loop"),
        _ => Some(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec()),
    })
    .await;
    let sb = sandbox();
    let hostile = sb.prepare(&guest_bytes("hostile")).unwrap();
    let policy = allow(&[site.addr.to_string()]);

    let got = success(&get(&sb, &hostile, &site.url("/to-self"), &policy).await);
    assert_eq!(
        got,
        json!({"status": 200, "bytes": 4}),
        "followed to /final"
    );

    // A hop to a destination not on the allow-list.
    let (category, message) = failure(&get(&sb, &hostile, &site.url("/to-other"), &policy).await);
    assert_eq!(category, Category::Denied, "{message}");
    assert!(
        message.contains("not in the task's allow-list"),
        "{message}"
    );
    assert!(
        message.contains(&format!("127.0.0.1:{other_port}")),
        "{message}"
    );

    // A hop to a name on the allow-list that resolves to loopback.
    let named = allow(&[site.addr.to_string(), format!("localhost:{other_port}")]);
    let (category, message) =
        failure(&get(&sb, &hostile, &site.url("/to-localhost"), &named).await);
    assert_eq!(category, Category::Denied, "{message}");
    assert!(message.contains("loopback"), "{message}");
    assert!(
        elsewhere.requests().is_empty(),
        "no hop reached the other server"
    );

    // A redirect loop ends after the SDK's limit, with a message saying so.
    let (_, message) = failure(&get(&sb, &hostile, &site.url("/loop"), &policy).await);
    assert!(message.contains("more than 5 redirects"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_over_the_size_cap_end_the_job_denied() {
    const CAP: u64 = 64 << 10;
    let big = vec![b'x'; 2 * CAP as usize];
    let declared = TestServer::start(move |_, _| Reply::ok(big.clone())).await;
    // Chunked, no content-length: the cap has to be enforced while reading.
    let streamed = RawServer::start(|_| {
        let mut reply =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
        for _ in 0..32 {
            reply.extend_from_slice(format!("{:x}\r\n", 8192).as_bytes());
            reply.extend_from_slice(&[b'y'; 8192]);
            reply.extend_from_slice(b"\r\n");
        }
        reply.extend_from_slice(b"0\r\n\r\n");
        Some(reply)
    })
    .await;
    let small = TestServer::start(|_, _| Reply::ok(vec![b'z'; 1000])).await;
    let sb = sandbox();
    let hostile = sb.prepare(&guest_bytes("hostile")).unwrap();
    let policy = SandboxPolicy {
        max_response_bytes: CAP,
        ..allow(&[
            declared.authority(),
            streamed.addr.to_string(),
            small.authority(),
        ])
    };

    for (url, authority) in [
        (declared.url("/"), declared.authority()),
        (streamed.url("/"), streamed.addr.to_string()),
    ] {
        let (category, message) = failure(&get(&sb, &hostile, &url, &policy).await);
        assert_eq!(category, Category::Denied, "{url}: {message}");
        assert!(
            message.contains(&format!(
                "response from {authority} larger than {CAP} bytes"
            )),
            "{url}: {message}"
        );
    }
    let got = success(&get(&sb, &hostile, &small.url("/"), &policy).await);
    assert_eq!(got, json!({"status": 200, "bytes": 1000}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_ends_in_a_timeout_not_a_hang() {
    let silent = RawServer::start(|_| None).await;
    let sb = sandbox();
    let hostile = sb.prepare(&guest_bytes("hostile")).unwrap();
    let policy = SandboxPolicy {
        timeout: Duration::from_secs(2),
        ..allow(&[silent.addr.to_string()])
    };
    let started = Instant::now();
    let (category, message) = failure(&get(&sb, &hostile, &silent.url("/"), &policy).await);
    assert_eq!(category, Category::Timeout, "{message}");
    // Generous bound: the point is that the job ends, not how fast.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the job's deadline must cut a silent server short"
    );
}

/// A job's network bytes are metered on the wire, both ways and across
/// redirect hops: exactly what the server read and wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_network_bytes_are_metered_both_ways() {
    let body = "b".repeat(5000);
    let (hop, page) = (redirect("/page").unwrap(), ok(&body).unwrap());
    let replies = (hop.clone(), page.clone());
    let server = RawServer::start(move |path| match path {
        "/start" => Some(replies.0.clone()),
        _ => Some(replies.1.clone()),
    })
    .await;
    let sb = sandbox();
    let hostile = sb.prepare(&guest_bytes("hostile")).unwrap();
    let policy = allow(&[server.addr.to_string()]);
    let outcome = get(&sb, &hostile, &server.url("/start"), &policy).await;
    assert_eq!(success(&outcome), json!({"status": 200, "bytes": 5000}));
    assert_eq!(
        outcome.usage.net_in_bytes,
        (hop.len() + page.len()) as u64,
        "both responses, heads included"
    );
    assert_eq!(
        outcome.usage.net_out_bytes,
        server.received.load(Ordering::Relaxed),
        "both requests"
    );
    assert!(outcome.usage.net_out_bytes > 0);

    // A job that makes no request has none.
    let quiet = get(&sb, &hostile, "http://not-allowed.example/", &policy).await;
    assert_eq!(
        (quiet.usage.net_out_bytes, quiet.usage.net_in_bytes),
        (0, 0)
    );
}
