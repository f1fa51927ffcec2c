//! The dashboard under test, served in this process on a free port
//! through the library's `web::serve`, and a small HTTP/1.1 client that
//! speaks to it the way a browser or curl would: cookies kept, any
//! header settable.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wasmq::broker::Broker;
use wasmq::web::{self, WebConfig};

/// A running dashboard; stopped on drop.
pub struct Dashboard {
    /// Where to reach it (always 127.0.0.1, whatever it binds).
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Dashboard {
    /// Serve `tenant` on `bind` (`127.0.0.1` for loopback, `0.0.0.0` for
    /// a dashboard that needs a token), port chosen by the OS.
    pub async fn start(
        broker: &Broker,
        tenant: &str,
        bind: &str,
        admin_token: Option<&str>,
        read_only: bool,
    ) -> Dashboard {
        let mut config = WebConfig::new(broker.clone(), tenant);
        config.admin_token = admin_token.map(String::from);
        config.read_only = read_only;
        Dashboard::start_with(bind, config).await
    }

    /// Serve `config` on `bind`, port chosen by the OS.
    pub async fn start_with(bind: &str, config: WebConfig) -> Dashboard {
        let listener = TcpListener::bind((bind, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(web::serve(listener, config, async move {
            let _ = stopped.await;
        }));
        Dashboard {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A client of this dashboard, with no credentials.
    pub fn client(&self) -> Client {
        Client {
            addr: self.addr,
            cookie: None,
            bearer: None,
            extra: Vec::new(),
            source: None,
        }
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The CSRF token in the page's forms.
    pub fn csrf(&self) -> Option<String> {
        let at = self.body.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
        let end = self.body[at..].find('"')?;
        Some(self.body[at..at + end].to_string())
    }
}

/// A tiny HTTP/1.1 client (one connection per request).
pub struct Client {
    addr: SocketAddr,
    /// The `wasmq_session` cookie it holds.
    pub cookie: Option<String>,
    /// Sent as `Authorization: Bearer ...` when set.
    pub bearer: Option<String>,
    /// Headers sent with every request.
    pub extra: Vec<(String, String)>,
    /// The local address to connect from (e.g. 127.0.0.2, another
    /// loopback client); the OS's choice when unset.
    pub source: Option<std::net::IpAddr>,
}

impl Client {
    pub async fn get(&mut self, path: &str) -> Resp {
        self.request("GET", path, &[], "").await
    }

    /// POST an urlencoded form.
    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Resp {
        let body: Vec<String> = form
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    wasmq::web::pages::enc(k),
                    wasmq::web::pages::enc(v)
                )
            })
            .collect();
        self.request(
            "POST",
            path,
            &[("content-type", "application/x-www-form-urlencoded")],
            &body.join("&"),
        )
        .await
    }

    /// GET `page`, then POST `action` with the CSRF token of that page.
    pub async fn act(&mut self, page: &str, action: &str) -> Resp {
        let shown = self.get(page).await;
        assert_eq!(shown.status, 200, "{page}: {}", shown.body);
        let csrf = shown
            .csrf()
            .unwrap_or_else(|| panic!("no CSRF token on {page}"));
        self.post(action, &[("csrf", &csrf)]).await
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Resp {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: {}\r\n", self.addr));
        }
        if let Some(c) = &self.cookie {
            head.push_str(&format!("Cookie: wasmq_session={c}\r\n"));
        }
        if let Some(b) = &self.bearer {
            head.push_str(&format!("Authorization: Bearer {b}\r\n"));
        }
        for (k, v) in self
            .extra
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(headers.iter().copied())
        {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut stream = match self.source {
            None => TcpStream::connect(self.addr).await.unwrap(),
            Some(ip) => {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::new(ip, 0)).unwrap();
                socket.connect(self.addr).await.unwrap()
            }
        };
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let resp = parse(&raw);
        for (k, v) in &resp.headers {
            if k == "set-cookie" {
                if let Some(value) = v
                    .split(';')
                    .next()
                    .and_then(|kv| kv.trim().strip_prefix("wasmq_session="))
                {
                    self.cookie = (!value.is_empty()).then(|| value.to_string());
                }
            }
        }
        resp
    }
}

fn parse(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = unchunk(&body);
    }
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    }
}

fn unchunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&raw[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
}
