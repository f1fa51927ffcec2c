//! The dashboard's actions: the only handlers that change anything, each
//! a POST the guard in [`super::guard`] has already checked (same
//! origin, CSRF token, not read-only). Each acts on the tenant in its URL
//! after checking the principal may see it, through the same broker calls
//! as the CLI (`wasmq queue pause`, `cancel`, `dead retry`, `dead purge`),
//! recording who acted as `web/admin@HOST` or `web/token-ID@HOST`.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use serde::Deserialize;

use super::auth::{self, SESSION_COOKIE};
use super::guard::{session_cookie, too_many_failures, ClientIp};
use super::pages::{self, enc};
use super::routes::{allowed, check_id, Ctx, PageResult, Shared, WebError};
use crate::broker::Cancelled;

/// How long a failed login waits before it answers, so guessing is slow.
const LOGIN_FAILURE_DELAY: std::time::Duration = std::time::Duration::from_millis(300);

/// The login form.
#[derive(Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    token: String,
}

/// `POST /login`: a valid token starts a session (an HttpOnly,
/// SameSite=Strict cookie). A login spends one unit of the client's
/// budget of failures before its token is checked, given back if it is
/// valid (see [`super::throttle`]); with none left, 429.
pub(crate) async fn login(
    State(app): State<Shared>,
    Extension(ClientIp(client)): Extension<ClientIp>,
    Form(form): Form<LoginForm>,
) -> Response {
    let token = form.token.trim();
    let attempt = match app.throttle.attempt(client) {
        Ok(attempt) => attempt,
        Err(wait) => return too_many_failures(wait),
    };
    let principal = match app.auth.check_token(&app.broker, token).await {
        Ok(Some(p)) => {
            attempt.succeeded();
            p
        }
        Ok(None) => {
            tokio::time::sleep(LOGIN_FAILURE_DELAY).await;
            let page = pages::login(Some("That token is not valid."));
            return (
                StatusCode::UNAUTHORIZED,
                axum::response::Html(page.into_string()),
            )
                .into_response();
        }
        Err(e) => return WebError::from(e).into_response(),
    };
    let Some(id) = app.auth.login(principal, token) else {
        return WebError(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many sessions are open; try again later.".into(),
        )
        .into_response();
    };
    let mut response = Redirect::to("/").into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        session_cookie(&id, auth::SESSION_TTL.as_secs()),
    );
    response
}

/// `POST /logout`: ends the session.
pub(crate) async fn logout(State(app): State<Shared>, headers: axum::http::HeaderMap) -> Response {
    if let Some(id) = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| auth::cookie(c, SESSION_COOKIE))
    {
        app.auth.logout(id);
    }
    let mut response = Redirect::to("/login").into_response();
    response
        .headers_mut()
        .append(header::SET_COOKIE, session_cookie("", 0));
    response
}

/// An error unless `tenant` has `queue`.
async fn check_queue(app: &Shared, tenant: &str, queue: &str) -> Result<(), WebError> {
    if app
        .broker
        .queue_names(tenant)
        .await?
        .iter()
        .any(|q| q == queue)
    {
        Ok(())
    } else {
        Err(WebError::not_found(format!(
            "Tenant {tenant:?} has no queue {queue:?}."
        )))
    }
}

fn to_queues(tenant: &str) -> Response {
    Redirect::to(&format!("/t/{}/queues", enc(tenant))).into_response()
}

fn to_job(tenant: &str, id: &str) -> Response {
    Redirect::to(&format!("/t/{}/jobs/{}", enc(tenant), enc(id))).into_response()
}

/// `POST /t/T/queues/Q/pause`.
pub(crate) async fn pause(
    State(app): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path((tenant, queue)): Path<(String, String)>,
) -> PageResult {
    allowed(&ctx, &tenant)?;
    check_queue(&app, &tenant, &queue).await?;
    app.broker
        .pause(&tenant, &queue, &ctx.principal.who())
        .await?;
    Ok(to_queues(&tenant))
}

/// `POST /t/T/queues/Q/resume`.
pub(crate) async fn resume(
    State(app): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path((tenant, queue)): Path<(String, String)>,
) -> PageResult {
    allowed(&ctx, &tenant)?;
    check_queue(&app, &tenant, &queue).await?;
    app.broker.resume(&tenant, &queue).await?;
    Ok(to_queues(&tenant))
}

/// `POST /t/T/jobs/ID/cancel`.
pub(crate) async fn cancel(
    State(app): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path((tenant, id)): Path<(String, String)>,
) -> PageResult {
    allowed(&ctx, &tenant)?;
    check_id(&id)?;
    match app
        .broker
        .cancel(&tenant, &id, &ctx.principal.who())
        .await?
    {
        Cancelled::Now { .. } => Ok(to_job(&tenant, &id)),
        Cancelled::AlreadyEnded(state) => Err(WebError::conflict(format!(
            "Job {id} has already ended ({state}); there is nothing to cancel."
        ))),
        Cancelled::Unknown => Err(WebError::not_found(format!(
            "No job {id} in tenant {tenant:?} (never enqueued, or its record expired)."
        ))),
    }
}

/// `POST /t/T/jobs/ID/retry`: a dead job runs again with fresh attempts.
pub(crate) async fn retry(
    State(app): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path((tenant, id)): Path<(String, String)>,
) -> PageResult {
    allowed(&ctx, &tenant)?;
    check_id(&id)?;
    if app.broker.dead_retry(&tenant, &id).await? {
        Ok(to_job(&tenant, &id))
    } else {
        Err(WebError::conflict(format!(
            "Job {id} is not in the dead-letter queue of tenant {tenant:?}; only dead jobs can be retried."
        )))
    }
}

/// `POST /t/T/dead/purge`: deletes every dead job of the tenant.
pub(crate) async fn purge(
    State(app): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(tenant): Path<String>,
) -> PageResult {
    allowed(&ctx, &tenant)?;
    let purged = app.broker.dead_purge(&tenant).await?;
    tracing::info!(%tenant, purged, who = %ctx.principal.who(), "dead letters purged from the dashboard");
    Ok(Redirect::to(&format!("/t/{}/dead", enc(&tenant))).into_response())
}
