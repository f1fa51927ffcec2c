//! The guard every request passes before its handler, and the headers
//! every response carries.
//!
//! In order:
//! 1. **Host** (open dashboards only: loopback, no token): only a
//!    loopback name (`localhost`, `127.x.x.x`, `[::1]`) is answered, 421
//!    otherwise, so a DNS-rebinding page cannot reach a dashboard that
//!    needs no token; and a request a proxy forwarded (`Forwarded`,
//!    `X-Forwarded-For`, `X-Real-IP`...) is refused (403): whoever sent
//!    it may not be on this machine, and an open dashboard is for no one
//!    else.
//! 2. **Origin** (POST): a cross-site `Origin` or `Sec-Fetch-Site` is
//!    refused (403).
//! 3. **Throttle** ([`super::throttle`]): a request carrying a bearer
//!    token spends one unit of its client's budget *before* the token is
//!    checked, and gets it back if the token is valid; a client with no
//!    budget left gets 429 with `Retry-After`, its token unchecked.
//!    (`POST /login` does the same in its handler.)
//! 4. **Who** ([`super::auth`]): 401 with the login form when nobody is
//!    (every listener once a token is configured); `/login` and
//!    `/assets/` are open to all.
//! 5. **Read-only** (POST): every action but logging out is refused (403).
//! 6. **CSRF** (POST): the form field `csrf` (or header `X-CSRF-Token`)
//!    must be this session's token (403 otherwise), checked before any
//!    handler runs, so no action can forget it.
//!
//! Every response gets the Content-Security-Policy, `X-Frame-Options`,
//! `nosniff`, a referrer policy and (pages) `Cache-Control: no-store`.

use axum::body::Body;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::{self, Refusal, SESSION_COOKIE};
use super::pages;
use super::routes::{html, Ctx, Shared, WebError};
use super::throttle;

/// The largest POST body read (action forms are a few dozen bytes).
const MAX_FORM_BYTES: usize = 16 * 1024;

/// The Content-Security-Policy of every response: nothing but this
/// origin's own files, no inline script or style, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Security headers on every response.
pub(crate) fn secure(mut response: Response, cacheable: bool) -> Response {
    let h = response.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    if !cacheable {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The session cookie header for `id`.
pub(crate) fn session_cookie(id: &str, max_age_secs: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The value of field `name` in an urlencoded form body (CSRF tokens are
/// hex: no decoding needed).
fn form_field<'a>(body: &'a [u8], name: &str) -> Option<&'a str> {
    std::str::from_utf8(body).ok()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then_some(v)
    })
}

/// Headers a proxy adds to what it forwards.
const FORWARDED_HEADERS: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// The client's address (for the throttle), set by the guard on every
/// request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientIp(pub IpAddr);

/// The answer to a client whose budget of failed token checks is spent.
pub(crate) fn too_many_failures(wait: std::time::Duration) -> Response {
    let secs = throttle::retry_after_secs(wait);
    let refused = WebError(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "Too many wrong tokens from your address: try again in {secs} s. (Behind a proxy, \
             every client has the proxy's address; see --trust-forwarded-for.)"
        ),
    );
    let mut response = refused.into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    secure(response, false)
}

/// Why an open dashboard (no token) refuses a request that may not come
/// from this machine's users, if it does: a `Host` that is not a
/// loopback name (a DNS-rebinding page), or a proxy's headers.
fn not_from_this_machine(headers: &HeaderMap) -> Option<WebError> {
    if !auth::loopback_host(header_str(headers, header::HOST)) {
        return Some(WebError(
            StatusCode::MISDIRECTED_REQUEST,
            "Refused: this dashboard listens on loopback only and answers only for localhost, \
             127.0.0.1 or [::1] (another Host could be a DNS-rebinding page)."
                .into(),
        ));
    }
    if FORWARDED_HEADERS.iter().any(|h| headers.contains_key(*h)) {
        return Some(WebError::forbidden(
            "Refused: this request came through a proxy, but this dashboard has no token and is \
             open to this machine's users only. To serve it behind a proxy, give it an admin token \
             (--token-file FILE or WASMQ_WEB_TOKEN): then every request needs a token.",
        ));
    }
    None
}

/// The guard: see the module docs.
pub(crate) async fn guard(State(app): State<Shared>, request: Request, next: Next) -> Response {
    // Served with connect info (see `super::serve`), so the peer is
    // always there; were it not, every client would share one budget.
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let client = throttle::client_address(
        peer,
        header_str(request.headers(), "x-forwarded-for"),
        app.trust_forwarded_for,
    );
    let path = request.uri().path().to_string();
    let public = path.starts_with("/assets/") || path == "/login";
    let cacheable = path.starts_with("/assets/");
    let is_post = request.method() == Method::POST;
    let headers = request.headers();
    let same_origin = auth::same_origin(
        header_str(headers, header::HOST),
        header_str(headers, header::ORIGIN),
        header_str(headers, "sec-fetch-site"),
    );
    let cookie = header_str(headers, header::COOKIE)
        .and_then(|c| auth::cookie(c, SESSION_COOKIE))
        .map(String::from);
    let authorization = header_str(headers, header::AUTHORIZATION).map(String::from);
    if app.auth.open {
        if let Some(refused) = not_from_this_machine(headers) {
            return secure(refused.into_response(), false);
        }
    }
    if is_post && !same_origin {
        let refused = WebError::forbidden(
            "Refused: this action came from another site (its Origin is not this dashboard).",
        );
        return secure(refused.into_response(), false);
    }
    let mut request = request;
    request.extensions_mut().insert(ClientIp(client));
    if public {
        return secure(next.run(request).await, cacheable);
    }
    // Counted before the check, so parallel guesses cannot outrun it.
    let attempt = match authorization.as_ref().map(|_| app.throttle.attempt(client)) {
        Some(Err(wait)) => return too_many_failures(wait),
        Some(Ok(attempt)) => Some(attempt),
        None => None,
    };
    let resolved = match app
        .auth
        .resolve(&app.broker, authorization.as_deref(), cookie.as_deref())
        .await
    {
        Ok(Ok(resolved)) => {
            if let Some(attempt) = attempt {
                attempt.succeeded();
            }
            resolved
        }
        Ok(Err(Refusal::Unauthorized(why))) => {
            let mut response =
                (StatusCode::UNAUTHORIZED, html(pages::login(Some(why)))).into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"wasmq\""),
            );
            return secure(response, false);
        }
        Err(e) => return secure(WebError::from(e).into_response(), false),
    };
    // Open, and no cookie yet: give the browser an anonymous one, the
    // key of its CSRF tokens.
    let mut new_cookie = None;
    let csrf_key = if resolved.csrf_key.is_empty() {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let key = format!("anon:{id}");
        new_cookie = Some(id);
        key
    } else {
        resolved.csrf_key.clone()
    };
    let ctx = Ctx {
        principal: resolved.principal,
        csrf: app.auth.csrf_token(&csrf_key),
        logged_in: resolved.logged_in,
    };
    if is_post {
        if app.read_only && path != "/logout" {
            let refused =
                WebError::forbidden("Refused: this dashboard is read-only (--read-only).");
            return secure(refused.into_response(), false);
        }
        // Read the (small) form body to check its CSRF token, then hand
        // it on to the handler.
        let (parts, body) = request.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM_BYTES).await else {
            let refused = WebError(
                StatusCode::PAYLOAD_TOO_LARGE,
                "The form is too large.".into(),
            );
            return secure(refused.into_response(), false);
        };
        let given = header_str(&parts.headers, "x-csrf-token")
            .or_else(|| form_field(&bytes, "csrf"))
            .unwrap_or("");
        if !app.auth.csrf_ok(&csrf_key, given) {
            let refused = WebError::forbidden(
                "Refused: the form's CSRF token is missing or wrong. Reload the page and try again.",
            );
            return secure(refused.into_response(), false);
        }
        request = Request::from_parts(parts, Body::from(bytes));
    }
    request.extensions_mut().insert(ctx);
    let mut response = next.run(request).await;
    if let Some(id) = new_cookie {
        response.headers_mut().append(
            header::SET_COOKIE,
            session_cookie(&id, auth::SESSION_TTL.as_secs()),
        );
    }
    secure(response, false)
}
