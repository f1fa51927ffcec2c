//! The dashboard's URL map, the guard every request passes, and the page
//! handlers (GET only: none of them changes anything).
//!
//! Every tenant's pages live under `/t/TENANT/`; a tenant token gets 403
//! for any other tenant's. On loopback the guard answers only requests
//! whose `Host` is a loopback name (421 otherwise: DNS rebinding). It
//! resolves who is asking
//! ([`super::auth`]), answers 401 (with the login form) when nobody is,
//! adds the security headers to every response, and for every POST
//! checks, before any handler runs: a same-origin request, the CSRF
//! token (form field `csrf` or header `X-CSRF-Token`), and read-only mode.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use maud::Markup;

use super::auth::{self, Principal, Refusal, SESSION_COOKIE};
use super::pages::{self, enc, Frame, JobFilter, TenantRow};
use super::{actions, assets, charts, App};
use crate::broker::{JobQuery, JobState};

/// The shared state.
pub(crate) type Shared = Arc<App>;

/// The largest POST body read (action forms are a few dozen bytes).
const MAX_FORM_BYTES: usize = 16 * 1024;

/// Jobs a listing shows at most.
const MAX_LIMIT: usize = 500;

/// The Content-Security-Policy of every response: nothing but this
/// origin's own files, no inline script or style, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Who is asking, for handlers (set by the guard).
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub principal: Principal,
    pub csrf: String,
    pub logged_in: bool,
}

/// A refusal or failure as an HTML page with its status.
#[derive(Debug)]
pub(crate) struct WebError(pub StatusCode, pub String);

impl WebError {
    pub fn not_found(message: impl Into<String>) -> Self {
        WebError(StatusCode::NOT_FOUND, message.into())
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        WebError(StatusCode::BAD_REQUEST, message.into())
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        WebError(StatusCode::FORBIDDEN, message.into())
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        WebError(StatusCode::CONFLICT, message.into())
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let page = pages::error(self.0.as_u16(), &self.1);
        (self.0, html(page)).into_response()
    }
}

impl From<anyhow::Error> for WebError {
    fn from(e: anyhow::Error) -> Self {
        // Redis errors can be long and say more than a page should; the
        // log has them whole.
        tracing::error!(error = %format!("{e:#}"), "dashboard request failed");
        WebError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The dashboard could not read or change Redis; its log names the error.".into(),
        )
    }
}

pub(crate) type PageResult = Result<Response, WebError>;

fn html(markup: Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

/// The URL map.
pub(crate) fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/switch", get(switch))
        .route("/login", get(login_page).post(actions::login))
        .route("/logout", post(actions::logout))
        .route("/tenants", get(tenants))
        .route("/assets/app.css", get(assets::css))
        .route("/assets/app.js", get(assets::js))
        .route("/t/{tenant}", get(tenant_root))
        .route("/t/{tenant}/", get(overview))
        .route("/t/{tenant}/api/overview", get(overview_json))
        .route("/t/{tenant}/queues", get(queues))
        .route("/t/{tenant}/queues/{queue}/pause", post(actions::pause))
        .route("/t/{tenant}/queues/{queue}/resume", post(actions::resume))
        .route("/t/{tenant}/workers", get(workers))
        .route("/t/{tenant}/jobs", get(jobs))
        .route("/t/{tenant}/jobs/{id}", get(job))
        .route("/t/{tenant}/jobs/{id}/cancel", post(actions::cancel))
        .route("/t/{tenant}/jobs/{id}/retry", post(actions::retry))
        .route("/t/{tenant}/dead", get(dead))
        .route("/t/{tenant}/dead/purge", post(actions::purge))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Security headers on every response.
fn secure(mut response: Response, cacheable: bool) -> Response {
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

/// The guard: see the module docs.
async fn guard(State(app): State<Shared>, request: Request, next: Next) -> Response {
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
    if app.auth.open && !auth::loopback_host(header_str(headers, header::HOST)) {
        let refused = WebError(
            StatusCode::MISDIRECTED_REQUEST,
            "Refused: this dashboard listens on loopback only and answers only for localhost, \
             127.0.0.1 or [::1] (another Host could be a DNS-rebinding page)."
                .into(),
        );
        return secure(refused.into_response(), false);
    }
    if is_post && !same_origin {
        let refused = WebError::forbidden(
            "Refused: this action came from another site (its Origin is not this dashboard).",
        );
        return secure(refused.into_response(), false);
    }
    if public {
        return secure(next.run(request).await, cacheable);
    }
    let resolved = match app
        .auth
        .resolve(&app.broker, authorization.as_deref(), cookie.as_deref())
        .await
    {
        Ok(Ok(resolved)) => resolved,
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
    // Loopback without a cookie: give the browser an anonymous one, the
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
    let mut request = request;
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

/// Check that `tenant` is a tenant name `ctx` may see.
pub(crate) fn allowed(ctx: &Ctx, tenant: &str) -> Result<(), WebError> {
    if crate::keys::valid_tenant(tenant).is_err() {
        return Err(WebError::not_found(format!(
            "There is no tenant {tenant:?} (names are 1-64 of a-z, 0-9, '-' and '_')."
        )));
    }
    match ctx.principal.own_tenant() {
        Some(own) if own != tenant => Err(WebError::forbidden(format!(
            "Forbidden: this token is for tenant {own:?} only."
        ))),
        _ => Ok(()),
    }
}

/// Tenants the principal may switch between.
async fn visible_tenants(app: &App, ctx: &Ctx) -> anyhow::Result<Vec<String>> {
    Ok(match ctx.principal.own_tenant() {
        Some(own) => vec![own.to_string()],
        None => {
            let mut names = app.broker.tenant_names().await?;
            for t in ["default", app.default_tenant.as_str()] {
                if !names.iter().any(|n| n == t) {
                    names.push(t.to_string());
                }
            }
            names.sort();
            names
        }
    })
}

/// Render a page in the frame.
async fn page(
    app: &App,
    ctx: &Ctx,
    tenant: &str,
    title: &str,
    active: &str,
    body: impl FnOnce(&Frame) -> Markup,
) -> PageResult {
    let tenants = visible_tenants(app, ctx).await?;
    let frame = Frame {
        title,
        tenant,
        active,
        principal: &ctx.principal,
        tenants: &tenants,
        csrf: &ctx.csrf,
        read_only: app.read_only,
        logged_in: ctx.logged_in,
    };
    Ok(html(body(&frame)))
}

/// The tenant `/` opens: the token's, or the dashboard's `--tenant`.
fn home_tenant(app: &App, ctx: &Ctx) -> String {
    ctx.principal
        .own_tenant()
        .unwrap_or(&app.default_tenant)
        .to_string()
}

async fn root(State(app): State<Shared>, Extension(ctx): Extension<Ctx>) -> Redirect {
    Redirect::to(&format!("/t/{}/", enc(&home_tenant(&app, &ctx))))
}

async fn tenant_root(Path(tenant): Path<String>) -> Redirect {
    Redirect::to(&format!("/t/{}/", enc(&tenant)))
}

async fn switch(
    Extension(ctx): Extension<Ctx>,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let tenant = q.get("tenant").cloned().unwrap_or_default();
    allowed(&ctx, &tenant)?;
    Ok(Redirect::to(&format!("/t/{}/", enc(&tenant))).into_response())
}

async fn login_page() -> Response {
    html(pages::login(None))
}

async fn not_found() -> WebError {
    WebError::not_found("No such page.")
}

async fn overview(
    State(app): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(tenant): Path<String>,
) -> PageResult {
    allowed(&ctx, &tenant)?;
    let queues = app.broker.queues(&tenant).await?;
    let workers = app
        .broker
        .workers()
        .await?
        .iter()
        .filter(|w| w.tenants.iter().any(|t| t == &tenant))
        .count();
    page(&app, &ctx, &tenant, "Overview", "overview", |f| {
        pages::overview(f, &queues, workers)
    })
    .await
}

async fn overview_json(
    State(app): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(tenant): Path<String>,
) -> PageResult {
    allowed(&ctx, &tenant)?;
    Ok(Json(charts::series(&app.broker, &tenant).await?).into_response())
}

async fn queues(
    State(app): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(tenant): Path<String>,
) -> PageResult {
    allowed(&ctx, &tenant)?;
    let queues = app.broker.queues(&tenant).await?;
    page(&app, &ctx, &tenant, "Queues", "queues", |f| {
        pages::queues(f, &queues)
    })
    .await
}

async fn workers(
    State(app): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(tenant): Path<String>,
) -> PageResult {
    allowed(&ctx, &tenant)?;
    let mut workers = app.broker.workers().await?;
    // The admin sees every worker; a tenant those serving it, and of the
    // tenants each serves only its own name.
    if let Some(own) = ctx.principal.own_tenant() {
        workers.retain(|w| w.tenants.iter().any(|t| t == own));
        for w in &mut workers {
            w.tenants.retain(|t| t == own);
        }
    }
    page(&app, &ctx, &tenant, "Workers", "workers", |f| {
        pages::workers(f, &workers)
    })
    .await
}

/// A job id as a URL or search box may give it: 1-128 of `[A-Za-z0-9_-]`
/// (ids are UUIDs; anything else cannot be one).
pub(crate) fn check_id(id: &str) -> Result<(), WebError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(WebError::bad_request(format!(
            "{id:?} is not a job id (job ids are UUIDs such as 0b6f7c1e-...)."
        )))
    }
}

async fn jobs(
    State(app): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(tenant): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    allowed(&ctx, &tenant)?;
    let get = |k: &str| q.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    if let Some(id) = get("id") {
        check_id(id)?;
        if app.broker.status(&tenant, id).await?.is_none() {
            return Err(WebError::not_found(format!(
                "No job {id} in tenant {tenant:?} (never enqueued, or its record expired)."
            )));
        }
        return Ok(Redirect::to(&format!("/t/{}/jobs/{}", enc(&tenant), enc(id))).into_response());
    }
    let state = get("state")
        .map(str::parse::<JobState>)
        .transpose()
        .map_err(WebError::bad_request)?;
    let limit = match get("limit") {
        None => 50,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                WebError::bad_request(format!(
                    "limit {l:?} is not a number from 1 to {MAX_LIMIT}."
                ))
            })?,
    };
    let queue_names = app.broker.queue_names(&tenant).await?;
    let queue = get("queue");
    if let Some(q) = queue {
        if !queue_names.iter().any(|n| n == q) {
            return Err(WebError::not_found(format!(
                "Tenant {tenant:?} has no queue {q:?}."
            )));
        }
    }
    let query = JobQuery {
        queue: queue.map(String::from),
        state,
        task: get("task").map(String::from),
        limit,
    };
    let found = app.broker.jobs(&tenant, &query).await?;
    let filter = JobFilter {
        state,
        queue,
        task: get("task"),
        limit,
    };
    page(&app, &ctx, &tenant, "Jobs", "jobs", |f| {
        pages::jobs(f, &filter, &queue_names, &found)
    })
    .await
}

async fn job(
    State(app): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path((tenant, id)): Path<(String, String)>,
) -> PageResult {
    allowed(&ctx, &tenant)?;
    check_id(&id)?;
    let Some(status) = app.broker.status(&tenant, &id).await? else {
        return Err(WebError::not_found(format!(
            "No job {id} in tenant {tenant:?} (never enqueued, or its record expired)."
        )));
    };
    let envelope = app.broker.envelope(&tenant, &id).await?;
    let result = app.broker.result(&tenant, &id, None).await?;
    let title = format!("Job {id}");
    page(&app, &ctx, &tenant, &title, "jobs", |f| {
        pages::job(f, &status, envelope.as_ref(), &result)
    })
    .await
}

async fn dead(
    State(app): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(tenant): Path<String>,
) -> PageResult {
    allowed(&ctx, &tenant)?;
    let query = JobQuery {
        state: Some(JobState::Dead),
        limit: 100,
        ..JobQuery::default()
    };
    let found = app.broker.jobs(&tenant, &query).await?;
    page(&app, &ctx, &tenant, "Dead letters", "dead", |f| {
        pages::dead(f, &found)
    })
    .await
}

async fn tenants(State(app): State<Shared>, Extension(ctx): Extension<Ctx>) -> PageResult {
    let names = visible_tenants(&app, &ctx).await?;
    let mut rows = Vec::with_capacity(names.len());
    for name in names {
        let limits = app
            .broker
            .tenant(&name)
            .await?
            .and_then(|t| serde_json::to_value(t.limits).ok());
        let usage = app.broker.usage(&name).await?;
        rows.push(TenantRow {
            name,
            limits,
            usage,
        });
    }
    let home = home_tenant(&app, &ctx);
    page(&app, &ctx, &home, "Tenants", "tenants", |f| {
        pages::tenants(f, &rows)
    })
    .await
}
