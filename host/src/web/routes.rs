//! The dashboard's URL map and its page handlers (GET only: none of them
//! changes anything; the POSTs are in [`super::actions`]), behind the
//! guard of [`super::guard`].
//!
//! Every tenant's pages live under `/t/TENANT/`; a tenant token gets 403
//! for any other tenant's.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use maud::Markup;

use super::auth::Principal;
use super::pages::{self, enc, Frame, JobFilter, TenantRow};
use super::{actions, assets, charts, guard, App};
use crate::broker::{JobQuery, JobState};

/// The shared state.
pub(crate) type Shared = Arc<App>;

/// Jobs a listing shows at most.
const MAX_LIMIT: usize = 500;

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

pub(crate) fn html(markup: Markup) -> Response {
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
        .route("/t/{tenant}/schedules", get(schedules))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), guard::guard))
        .with_state(app)
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

async fn schedules(
    State(app): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(tenant): Path<String>,
) -> PageResult {
    allowed(&ctx, &tenant)?;
    let schedules = app.broker.schedule_list(&tenant).await?;
    page(&app, &ctx, &tenant, "Schedules", "schedules", |f| {
        pages::schedules(f, &schedules)
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
