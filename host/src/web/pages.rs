//! The dashboard's HTML, one function per page, rendered with maud: every
//! interpolated value is escaped (payloads, results, errors, task and
//! queue names are guest- or user-controlled), and no page has inline
//! script or style, so the Content-Security-Policy can forbid both.
//!
//! Pages show only what the broker returned; they fetch nothing. Action
//! buttons are POST forms carrying the CSRF token, left out in read-only
//! mode.

use maud::{html, Markup, DOCTYPE};

use super::auth::Principal;
use crate::broker::envelope::Envelope;
use crate::broker::{
    JobState, JobStatus, JobSummary, QueueView, ResultState, ScheduleView, WorkerBeat,
};

/// What every page's frame needs.
pub struct Frame<'a> {
    /// Page title.
    pub title: &'a str,
    /// The tenant shown.
    pub tenant: &'a str,
    /// Which nav entry is current.
    pub active: &'a str,
    /// Who is looking.
    pub principal: &'a Principal,
    /// Tenants the admin may switch to (empty for a tenant token).
    pub tenants: &'a [String],
    /// The CSRF token for forms.
    pub csrf: &'a str,
    /// No actions.
    pub read_only: bool,
    /// Logged in with a session (shows "log out").
    pub logged_in: bool,
}

impl Frame<'_> {
    /// Whether action buttons are shown.
    fn acts(&self) -> bool {
        !self.read_only
    }
}

/// A path segment or query value, percent-encoded.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `ms` since the epoch as RFC 3339 (UTC, ms).
pub fn time(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

fn opt_time(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".to_string(), time)
}

/// Milliseconds as a short duration (`850ms`, `12.3s`, `4m05s`, `2h10m`).
pub fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// A failure JSON (`{"category", "message"}`) as one line.
fn error_line(e: &serde_json::Value) -> String {
    match (e["category"].as_str(), e["message"].as_str()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        _ => e.to_string(),
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// A POST button.
fn action(frame: &Frame, url: &str, label: &str, confirm: Option<&str>, class: &str) -> Markup {
    html! {
        form.inline method="post" action=(url) data-confirm=[confirm] {
            input type="hidden" name="csrf" value=(frame.csrf);
            button.(class) type="submit" { (label) }
        }
    }
}

/// The page frame: head, nav, body.
pub fn layout(frame: &Frame, body: Markup) -> Markup {
    let t = enc(frame.tenant);
    let nav = [
        ("overview", format!("/t/{t}/"), "Overview"),
        ("queues", format!("/t/{t}/queues"), "Queues"),
        ("workers", format!("/t/{t}/workers"), "Workers"),
        ("jobs", format!("/t/{t}/jobs"), "Jobs"),
        ("dead", format!("/t/{t}/dead"), "Dead letters"),
        ("schedules", format!("/t/{t}/schedules"), "Schedules"),
        ("tenants", "/tenants".to_string(), "Tenants"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (frame.title) " · wasmq" }
                link rel="stylesheet" href="/assets/app.css";
                script src="/assets/app.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "wasmq" }
                    nav {
                        @for (key, href, label) in &nav {
                            a href=(href) class=[(frame.active == *key).then_some("active")] { (label) }
                        }
                    }
                    div.who {
                        @if frame.tenants.len() > 1 {
                            form.inline method="get" action="/switch" {
                                select name="tenant" data-autosubmit="1" {
                                    @for name in frame.tenants {
                                        option value=(name) selected[name == frame.tenant] { (name) }
                                    }
                                }
                                noscript { button type="submit" { "go" } }
                            }
                        } @else {
                            span.tenant { "tenant " (frame.tenant) }
                        }
                        span.role {
                            @match frame.principal {
                                Principal::Admin => "admin",
                                Principal::Tenant { .. } => "tenant token",
                            }
                        }
                        @if frame.read_only { span.badge { "read-only" } }
                        @if frame.logged_in {
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(frame.csrf);
                                button.link type="submit" { "log out" }
                            }
                        }
                    }
                }
                main {
                    h1 { (frame.title) }
                    (body)
                }
            }
        }
    }
}

/// The overview: headline figures and the live charts.
pub fn overview(frame: &Frame, queues: &[QueueView], workers: usize) -> Markup {
    let sum = |f: fn(&QueueView) -> u64| queues.iter().map(f).sum::<u64>();
    let oldest = queues.iter().filter_map(|q| q.oldest_ready_age_ms).max();
    let paused = queues.iter().filter(|q| q.paused.is_some()).count();
    let api = format!("/t/{}/api/overview", enc(frame.tenant));
    layout(
        frame,
        html! {
            section.tiles {
                div.tile { b { (sum(|q| q.ready)) } span { "ready" } }
                div.tile { b { (sum(|q| q.delayed)) } span { "scheduled" } }
                div.tile { b { (sum(|q| q.running)) } span { "running" } }
                div.tile { b { (sum(|q| q.dead)) } span { "dead" } }
                div.tile { b { (oldest.map_or("-".into(), age)) } span { "oldest ready" } }
                div.tile { b { (workers) } span { "live workers" } }
                div.tile { b { (queues.len()) " / " (paused) } span { "queues / paused" } }
            }
            section #charts data-src=(api) {
                div.chart {
                    h2 { "Throughput per minute " small { "succeeded " b #total-succeeded { "…" } " · failed " b #total-failed { "…" } " (last hour)" } }
                    svg #chart-throughput viewBox="0 0 720 160" role="img" aria-label="succeeded and failed runs per minute" {}
                }
                div.chart {
                    h2 { "Latency " small { "enqueue to finish, p50 and p95; run time p50 (ms)" } }
                    svg #chart-latency viewBox="0 0 720 160" role="img" aria-label="latency per minute" {}
                }
                div.chart {
                    h2 { "Failure rate " small { "failed runs / all runs (%)" } }
                    svg #chart-failures viewBox="0 0 720 160" role="img" aria-label="failure rate per minute" {}
                }
                p.note #chart-status { "Charts load with JavaScript; the figures are also at " a href=(api) { "this JSON" } "." }
            }
        },
    )
}

/// The queues, with pause and resume.
pub fn queues(frame: &Frame, queues: &[QueueView]) -> Markup {
    let t = enc(frame.tenant);
    layout(
        frame,
        html! {
            @if queues.is_empty() {
                p { "No queues: tenant " (frame.tenant) " has deployed no task." }
            } @else {
                table {
                    thead { tr {
                        th { "queue" } th.n { "ready" } th.n { "scheduled" } th.n { "running" } th.n { "dead" }
                        th { "state" } th.n { "oldest ready" } th.n { "succeeded" } th.n { "failed" }
                        th.n title="workflow steps waiting for other steps" { "waiting" }
                        @if frame.acts() { th {} }
                    } }
                    tbody {
                        @for q in queues {
                            @let jobs = format!("/t/{t}/jobs?queue={}", enc(&q.name));
                            tr data-queue=(q.name) {
                                td { a href=(jobs) { (q.name) } }
                                td.n { (q.ready) } td.n { (q.delayed) } td.n { (q.running) } td.n { (q.dead) }
                                td {
                                    @match &q.paused {
                                        Some(p) => { span.badge.paused { "paused" } " by " (p.by) " at " (time(p.at_ms)) }
                                        None => span.badge.active { "active" },
                                    }
                                }
                                td.n { (q.oldest_ready_age_ms.map_or("-".into(), age)) }
                                td.n { (q.succeeded_last_minute) } td.n { (q.failed_last_minute) }
                                td.n { (q.waiting) }
                                @if frame.acts() {
                                    td {
                                        @let base = format!("/t/{t}/queues/{}", enc(&q.name));
                                        @if q.paused.is_some() {
                                            (action(frame, &format!("{base}/resume"), "Resume", None, "resume"))
                                        } @else {
                                            (action(frame, &format!("{base}/pause"), "Pause", None, "pause"))
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                p.note { "succeeded and failed: runs in this clock minute and the one before." }
            }
        },
    )
}

/// Live workers from their heartbeats.
pub fn workers(frame: &Frame, workers: &[WorkerBeat]) -> Markup {
    layout(
        frame,
        html! {
            @if workers.is_empty() {
                p { "No live workers serving tenant " (frame.tenant) "." }
            }
            @for w in workers {
                div.card {
                    h2 { (w.id) }
                    p {
                        "host " b { (w.host) } " · pid " (w.pid) " · v" (w.version)
                        " · tenants " (w.tenants.join(", "))
                        " · started " (time(w.started_at_ms))
                        " · last beat " (time(w.last_beat_at_ms))
                        " · jobs done " (w.jobs_done)
                    }
                    table {
                        thead { tr { th { "pool" } th { "kind" } th.n { "busy / slots" } th { "queues" } } }
                        tbody {
                            @for p in &w.pools {
                                tr { td { (p.id) } td { (p.kind) } td.n { (p.busy) " / " (p.slots) } td { (p.queues.join(", ")) } }
                            }
                        }
                    }
                }
            }
            p.note { "A worker publishes a heartbeat every 2 s; one that stops beating leaves this list within 10 s." }
        },
    )
}

/// The filters of the jobs page.
pub struct JobFilter<'a> {
    /// State, if one.
    pub state: Option<JobState>,
    /// Queue, if one.
    pub queue: Option<&'a str>,
    /// Task, if one.
    pub task: Option<&'a str>,
    /// How many.
    pub limit: usize,
}

/// A table of jobs.
fn job_table(frame: &Frame, jobs: &[JobSummary]) -> Markup {
    let t = enc(frame.tenant);
    html! {
        @if jobs.is_empty() {
            p.empty { "No jobs." }
        } @else {
            table.jobs {
                thead { tr { th { "job" } th { "state" } th { "task" } th { "queue" } th.n { "attempts" } th { "when" } th { "error" } } }
                tbody {
                    @for j in jobs {
                        tr data-job=(j.id) {
                            td.mono { a href=(format!("/t/{t}/jobs/{}", enc(&j.id))) { (j.id) } }
                            td { span class=(format!("badge {}", j.state.as_str())) { (j.state.as_str()) } }
                            td { (j.task) } td { (j.queue) } td.n { (j.attempts) }
                            td {
                                @match j.state {
                                    JobState::Queued => { "enqueued " (opt_time(j.enqueued_at_ms)) }
                                    JobState::Scheduled => { "due " (opt_time(j.due_at_ms)) }
                                    JobState::Running => { "started " (opt_time(j.started_at_ms)) " on " (j.worker.as_deref().unwrap_or("?")) }
                                    _ => { "ended " (opt_time(j.finished_at_ms)) }
                                }
                            }
                            td.error { @if let Some(e) = &j.last_error { (error_line(e)) } }
                        }
                    }
                }
            }
        }
    }
}

/// Jobs by state, queue and task, with search by id.
pub fn jobs(
    frame: &Frame,
    filter: &JobFilter,
    queue_names: &[String],
    jobs: &[JobSummary],
) -> Markup {
    let t = enc(frame.tenant);
    layout(
        frame,
        html! {
            form.search method="get" action=(format!("/t/{t}/jobs")) {
                label { "Job id " input #job-id type="search" name="id" placeholder="job id" autocomplete="off"; }
                button #find-job type="submit" { "Find" }
            }
            form.filters method="get" action=(format!("/t/{t}/jobs")) {
                label { "State "
                    select name="state" {
                        option value="" selected[filter.state.is_none()] { "any" }
                        @for s in JobState::ALL {
                            option value=(s.as_str()) selected[filter.state == Some(s)] { (s.as_str()) }
                        }
                    }
                }
                label { "Queue "
                    select name="queue" {
                        option value="" selected[filter.queue.is_none()] { "any" }
                        @for q in queue_names {
                            option value=(q) selected[filter.queue == Some(q.as_str())] { (q) }
                        }
                    }
                }
                label { "Task " input type="text" name="task" value=[filter.task]; }
                label { "Limit " input type="number" name="limit" min="1" max="500" value=(filter.limit); }
                button type="submit" { "Filter" }
            }
            (job_table(frame, jobs))
            p.note { "Newest first. Succeeded and cancelled jobs: the newest 10,000 of each are indexed." }
        },
    )
}

/// Links to jobs of tenant `t` (encoded), `-` for none.
fn job_links(t: &str, ids: &[String]) -> Markup {
    html! {
        @if ids.is_empty() { "-" }
        @for (i, id) in ids.iter().enumerate() {
            @if i > 0 { ", " }
            a.mono href=(format!("/t/{t}/jobs/{}", enc(id))) { (id) }
        }
    }
}

/// One job: state, buttons, payload, result, usage, history.
pub fn job(
    frame: &Frame,
    status: &JobStatus,
    envelope: Option<&Envelope>,
    result: &ResultState,
) -> Markup {
    let t = enc(frame.tenant);
    let base = format!("/t/{t}/jobs/{}", enc(&status.id));
    let cancellable = matches!(
        status.state.as_str(),
        "queued" | "scheduled" | "active" | "waiting"
    );
    layout(
        frame,
        html! {
            div.card {
                p.mono #job-id-shown { (status.id) }
                p {
                    span #job-state class=(format!("badge {}", status.state)) { (status.state) }
                    " task " b { (status.task.as_deref().unwrap_or("?")) }
                    @if let Some(e) = envelope { " · queue " b { (e.queue) } " · priority " (e.priority) }
                }
                @if frame.acts() {
                    div.actions {
                        @if cancellable {
                            (action(frame, &format!("{base}/cancel"), "Cancel job", Some("Cancel this job?"), "cancel danger"))
                        }
                        @if status.state == "dead" {
                            (action(frame, &format!("{base}/retry"), "Retry job", None, "retry"))
                        }
                    }
                }
                table.kv {
                    tr { th { "attempts" } td { (status.attempts) " (" (status.deliveries) " deliveries, " (status.lost_deliveries) " lost, " (status.host_retries) " host retries)" } }
                    tr { th { "enqueued" } td { (opt_time(status.enqueued_at_ms)) } }
                    @if let Some(due) = status.due_at_ms { tr { th { "due" } td { (time(due)) } } }
                    tr { th { "started" } td { (opt_time(status.started_at_ms)) } }
                    tr { th { "finished" } td { (opt_time(status.finished_at_ms)) } }
                    @if let Some(e) = &status.last_error { tr { th { "last error" } td.error { (error_line(e)) } } }
                    @if let Some(k) = envelope.and_then(|e| e.idempotency_key.as_deref()) { tr { th { "idempotency key" } td { (k) } } }
                    @for d in &status.denials { tr { th { "denied" } td { (d) } } }
                    @for f in &status.flows_started { tr { th { "started flow" } td.mono { (f) } } }
                    @if let Some(f) = &status.flow {
                        tr { th { "flow" } td.mono #job-flow { (f.flow_id) " (" (f.settled) " of " (f.steps) " steps ended)" } }
                        @if let Some(p) = &f.started_by { tr { th { "started by" } td { (job_links(&t, std::slice::from_ref(p))) } } }
                        tr { th { "waits for" } td #job-waits { (job_links(&t, &f.waits_on)) } }
                        @if status.state == "waiting" { tr { th { "still waits for" } td { (job_links(&t, &f.still_waiting_on)) } } }
                        tr { th { "then" } td { (job_links(&t, &f.dependents)) } }
                    }
                }
            }
            h2 { "Payload" }
            @match envelope {
                Some(e) => pre #payload { (pretty(&e.payload)) },
                None => p.empty { "The envelope cannot be read." },
            }
            h2 { "Result" }
            @match result {
                ResultState::Ready(v) => pre #result { (pretty(v)) },
                ResultState::Pending => p.empty { "Not finished yet." },
                ResultState::Ignored => p.empty { "Succeeded; its result was not stored (the task's policy)." },
                ResultState::Expired => p.empty { "Succeeded; its stored result has expired." },
                ResultState::Failed(f) => p.error { (f.to_string()) },
                ResultState::Unknown => p.empty { "No record." },
            }
            h2 { "Usage " small { "of the last recorded run" } }
            @match &status.usage {
                Some(u) => table.kv {
                    @for (k, v) in u.as_object().into_iter().flatten() {
                        tr { th { (k) } td.n { (v) } }
                    }
                },
                None => p.empty { "No run recorded yet." },
            }
            h2 { "Timeline" }
            table #timeline {
                thead { tr { th { "at" } th { "event" } th { "detail" } } }
                tbody {
                    @for e in &status.history {
                        tr {
                            td { (e["at_ms"].as_u64().map_or("?".into(), time)) }
                            td { (e["event"].as_str().unwrap_or("?")) }
                            td {
                                @match &e["detail"] {
                                    serde_json::Value::Null => "",
                                    serde_json::Value::String(s) => (s),
                                    other => (error_line(other)),
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Log (last run)" }
            @match &status.log {
                Some(log) => pre.log { (log) },
                None => p.empty { "The last run wrote nothing (the record keeps the last 4 KiB of a run's stdout, stderr and log lines)." },
            }
        },
    )
}

/// The dead-letter queue.
pub fn dead(frame: &Frame, jobs: &[JobSummary]) -> Markup {
    let t = enc(frame.tenant);
    layout(
        frame,
        html! {
            @if frame.acts() && !jobs.is_empty() {
                div.actions {
                    (action(frame, &format!("/t/{t}/dead/purge"), "Purge all dead jobs", Some("Delete every dead job of this tenant?"), "purge danger"))
                }
            }
            @if jobs.is_empty() {
                p.empty { "No dead jobs." }
            } @else {
                table.jobs {
                    thead { tr { th { "job" } th { "task" } th { "queue" } th.n { "attempts" } th { "died" } th { "error" } @if frame.acts() { th {} } } }
                    tbody {
                        @for j in jobs {
                            @let url = format!("/t/{t}/jobs/{}", enc(&j.id));
                            tr data-job=(j.id) {
                                td.mono { a href=(url) { (j.id) } }
                                td { (j.task) } td { (j.queue) } td.n { (j.attempts) }
                                td { (opt_time(j.finished_at_ms)) }
                                td.error { @if let Some(e) = &j.last_error { (error_line(e)) } }
                                @if frame.acts() { td { (action(frame, &format!("{url}/retry"), "Retry", None, "retry")) } }
                            }
                        }
                    }
                }
                p.note { "Newest first, at most 100." }
            }
        },
    )
}

/// The tenant's schedules: timing, next tick, last tick and its job.
pub fn schedules(frame: &Frame, schedules: &[ScheduleView]) -> Markup {
    let t = enc(frame.tenant);
    layout(
        frame,
        html! {
            @if schedules.is_empty() {
                p.empty { "No schedules. " code { "wasmq schedule add NAME TASK --cron EXPR" } " makes one." }
            } @else {
                table.jobs {
                    thead { tr { th { "schedule" } th { "task" } th { "timing" } th { "catch-up" } th { "next tick" } th { "last tick" } th { "last job" } } }
                    tbody {
                        @for v in schedules {
                            tr data-schedule=(v.name) {
                                td { (v.name) }
                                @match &v.schedule {
                                    Ok(s) => {
                                        td { (s.task) }
                                        td.mono { (s.timing.describe()) }
                                        td { (s.catch_up.as_str()) }
                                        td {
                                            @if s.paused { span.badge.cancelled { "paused" } }
                                            @else { (opt_time(v.next_ms)) }
                                        }
                                    }
                                    Err(e) => { td.error colspan="4" { "cannot be read, not fired: " (e) } }
                                }
                                td { (opt_time(v.last.as_ref().map(|l| l.tick_ms))) }
                                td {
                                    @if let Some(last) = &v.last {
                                        @if let Some(job) = &last.job {
                                            a.mono href=(format!("/t/{t}/jobs/{}", enc(job))) { (job) }
                                            " "
                                            @let state = v.last_job_state.as_deref().unwrap_or("?");
                                            span class=(format!("badge {state}")) { (state) }
                                        } @else {
                                            span.error { "not enqueued: " (last.error.as_deref().unwrap_or("?")) }
                                        }
                                    } @else { "-" }
                                }
                            }
                        }
                    }
                }
            }
            p.note { "Every running worker fires due schedules; each tick is one job. Manage them with " code { "wasmq schedule" } "." }
        },
    )
}

/// One tenant's row on the tenants page.
pub struct TenantRow {
    /// Name.
    pub name: String,
    /// Its caps, as JSON (none without a record).
    pub limits: Option<serde_json::Value>,
    /// Its usage.
    pub usage: crate::broker::TenantUsage,
}

/// Tenants and their usage.
pub fn tenants(frame: &Frame, rows: &[TenantRow]) -> Markup {
    const SHOWN: [&str; 10] = [
        "runs",
        "fuel",
        "wall_time_us",
        "run_time_us",
        "memory_byte_seconds",
        "net_out_bytes",
        "net_in_bytes",
        "denied",
        "wasted_runs",
        "store_bytes",
    ];
    layout(
        frame,
        html! {
            table {
                thead { tr { th { "tenant" } @for f in SHOWN { th.n { (f) } } th { "caps" } } }
                tbody {
                    @for r in rows {
                        tr data-tenant=(r.name) {
                            td { a href=(format!("/t/{}/", enc(&r.name))) { (r.name) } }
                            @for f in SHOWN { td.n { (r.usage.get(f).copied().unwrap_or(0)) } }
                            td.mono.small {
                                @match &r.limits {
                                    Some(l) => (l.to_string()),
                                    None => "no record: uncapped",
                                }
                            }
                        }
                    }
                }
            }
            p.note { "Usage sums every recorded run; store_bytes is what the tenant's guests hold now." }
        },
    )
}

/// The login form (and, with `error`, why the last try failed).
pub fn login(error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Log in · wasmq" }
                link rel="stylesheet" href="/assets/app.css";
            }
            body.login {
                main {
                    h1 { "wasmq" }
                    p { "This dashboard needs a token: the admin token, or a tenant's (" code { "wasmq web token create" } ")." }
                    @if let Some(e) = error { p.error { (e) } }
                    form method="post" action="/login" {
                        label { "Token " input type="password" name="token" autocomplete="current-password" autofocus; }
                        button type="submit" { "Log in" }
                    }
                }
            }
        }
    }
}

/// An error page.
pub fn error(status: u16, message: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (status) " · wasmq" }
                link rel="stylesheet" href="/assets/app.css";
            }
            body {
                main {
                    h1 { (status) }
                    p.error #error { (message) }
                    p { a href="/" { "Back to the dashboard" } }
                }
            }
        }
    }
}
