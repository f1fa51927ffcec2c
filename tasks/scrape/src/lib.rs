//! `scrape`: fetch a page, count its links, and count pages scraped across
//! all jobs of the tenant.
//!
//! The seed kept `PAGES_SCRAPED` in a global, which is wrong twice over in
//! wasmq: every job gets a fresh instance (the global restarts at 0), and a
//! job can run more than once (a retry would count the page again). Here
//! the count lives in a host counter, bumped with `incr_once` keyed by the
//! URL (atomic on the host), so scraping the same page again, or a job run
//! again after its worker died, does not count it twice.

use serde::{Deserialize, Serialize};
use wasmq_guest::{counter, http, Job, TaskError};

/// Payload: `{"url": "http://example.com/"}`.
#[derive(Deserialize)]
struct Args {
    url: String,
}

/// Result.
#[derive(Serialize)]
struct Out {
    url: String,
    /// Size of the response body.
    bytes: usize,
    /// Number of `<a ` tags (case-insensitive) in the body.
    links: usize,
    /// Tenant-wide count of distinct pages scraped so far.
    pages_scraped: i64,
}

const PAGES_SCRAPED: &str = "pages-scraped";

#[wasmq_guest::task]
fn run(_job: &Job, args: Args) -> Result<Out, TaskError> {
    let resp = http::get(&args.url)?;
    match resp.status {
        200..=299 => {}
        // Rate-limited or a server hiccup: worth another try later.
        429 | 500..=599 => {
            return Err(TaskError::retry(format!(
                "{} answered {}",
                args.url, resp.status
            )))
        }
        s => return Err(TaskError::fail(format!("{} answered {s}", args.url))),
    }
    let links = count_links(&resp.body);

    // Counted once per URL, atomically on the host: retries, duplicate
    // jobs and redeliveries after a crash add nothing.
    counter::incr_once(PAGES_SCRAPED, 1, &format!("scraped:{}", args.url))?;
    let pages_scraped = counter::get(PAGES_SCRAPED)?;

    Ok(Out {
        url: args.url,
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
