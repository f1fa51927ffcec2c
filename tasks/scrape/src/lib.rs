//! `scrape`: fetch a page, count its links, and count pages scraped across
//! all jobs of the tenant.
//!
//! The seed kept `PAGES_SCRAPED` in a global, which is wrong twice over in
//! wasmq: every job gets a fresh instance (the global restarts at 0), and a
//! job can run more than once (a retry would count the page again). Here
//! the count lives in a host counter, bumped with `incr_once` keyed by the
//! URL (atomic on the host), so scraping the same page again, or a job run
//! again after its worker died, does not count it twice.
//!
//! Given a list of pages instead, it fans out as a chord: one `scrape` job
//! per page, then one `scrape` summary that receives every page's result
//! in its job context. The job that fans out returns at once; nothing
//! waits, and a retry of it starts the same flow again, not a second one.

use serde::{Deserialize, Serialize};
use wasmq_guest::{counter, flow, http, Job, TaskError};

/// Payload: `{"url": "http://example.com/"}` for one page,
/// `{"pages": ["http://...", ...]}` to fan out over many, and
/// `{"summarize": true}` for the step that sums their results up.
#[derive(Deserialize)]
#[serde(untagged)]
enum Args {
    Page { url: String },
    Site { pages: Vec<String> },
    Summary { summarize: bool },
}

/// Result of one page.
#[derive(Serialize, Deserialize)]
struct Page {
    url: String,
    /// Size of the response body.
    bytes: usize,
    /// Number of `<a ` tags (case-insensitive) in the body.
    links: usize,
    /// Tenant-wide count of distinct pages scraped so far.
    pages_scraped: i64,
}

const PAGES_SCRAPED: &str = "pages-scraped";

/// What the summary step returns.
#[derive(Serialize)]
struct Summary {
    pages: usize,
    bytes: usize,
    links: usize,
    urls: Vec<String>,
}

#[wasmq_guest::task]
fn run(job: &Job, args: Args) -> Result<serde_json::Value, TaskError> {
    let out = match args {
        Args::Page { url } => serde_json::to_value(scrape(url)?),
        Args::Site { pages } => serde_json::to_value(fan_out(&pages)?),
        Args::Summary { summarize: true } => serde_json::to_value(summarize(job)?),
        Args::Summary { summarize: false } => {
            return Err(TaskError::fail("`summarize: false` asks for nothing"))
        }
    };
    out.map_err(|e| TaskError::fail(format!("result: {e}")))
}

/// One job per page, then the summary: started, not waited for.
fn fan_out(pages: &[String]) -> Result<flow::Started, TaskError> {
    if pages.is_empty() {
        return Err(TaskError::fail("no pages to scrape"));
    }
    let steps = pages
        .iter()
        .map(|url| flow::step("scrape", &serde_json::json!({ "url": url })));
    let then = flow::step("scrape", &serde_json::json!({ "summarize": true }));
    Ok(flow::start(&flow::chord(steps, then))?)
}

/// Every page's result, from the job context.
fn summarize(job: &Job) -> Result<Summary, TaskError> {
    let pages: Vec<Page> = job.results()?;
    Ok(Summary {
        pages: pages.len(),
        bytes: pages.iter().map(|p| p.bytes).sum(),
        links: pages.iter().map(|p| p.links).sum(),
        urls: pages.into_iter().map(|p| p.url).collect(),
    })
}

fn scrape(url: String) -> Result<Page, TaskError> {
    let resp = http::get(&url)?;
    match resp.status {
        200..=299 => {}
        // Rate-limited or a server hiccup: worth another try later.
        429 | 500..=599 => {
            return Err(TaskError::retry(format!(
                "{} answered {}",
                url, resp.status
            )))
        }
        s => return Err(TaskError::fail(format!("{url} answered {s}"))),
    }
    let links = count_links(&resp.body);

    // Counted once per URL, atomically on the host: retries, duplicate
    // jobs and redeliveries after a crash add nothing.
    counter::incr_once(PAGES_SCRAPED, 1, &format!("scraped:{url}"))?;
    let pages_scraped = counter::get(PAGES_SCRAPED)?;

    Ok(Page {
        url,
        bytes: resp.body.len(),
        links,
        pages_scraped,
    })
}

/// Counts `<a ` (any case) in `html`: crude, but it needs no HTML parser.
fn count_links(html: &[u8]) -> usize {
    html.windows(3)
        .filter(|w| w[0] == b'<' && w[1].eq_ignore_ascii_case(&b'a') && w[2].is_ascii_whitespace())
        .count()
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_anchor_tags_only() {
        let html = b"<a href=x>1</a><A\nhref=y>2</a><abbr>no</abbr><area>";
        assert_eq!(super::count_links(html), 2);
    }
}
