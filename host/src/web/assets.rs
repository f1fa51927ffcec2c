//! The dashboard's static files, compiled into the binary
//! (`include_str!`): one stylesheet and one script, no CDN, no build
//! step. Served under `/assets/` without authentication (they hold no
//! data).

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The stylesheet.
const APP_CSS: &str = include_str!("assets/app.css");
/// The script: charts, confirmations, the tenant switcher.
const APP_JS: &str = include_str!("assets/app.js");

/// `GET /assets/app.css`.
pub async fn css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// `GET /assets/app.js`.
pub async fn js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Cheap to refetch; a new binary's assets show at once.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
