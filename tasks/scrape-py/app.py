"""scrape-py: fetch a page, count its links, and count pages scraped
across all jobs of the tenant; the twin of the Rust ``scrape``
(tasks/scrape), with the same payloads, results and retry behaviour.

A module-level ``PAGES_SCRAPED = 0`` would be wrong twice over in wasmq:
every job gets a fresh interpreter (the global restarts at 0), and a job
can run more than once (a retry would count the page again). The count
lives in a host counter instead, bumped with ``incr_once`` keyed by the URL
(atomic on the host), so scraping the same page again, or a job run again
after its worker died, does not count it twice.

Given a list of pages it fans out as a chord: one ``scrape`` job per page,
then one ``scrape`` summary that receives every page's result in its job
context. The job that fans out returns at once; nothing waits, and a retry
of it finds the flow it started rather than starting a second one.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from wasmq import Fail, Job, Retry, counters, flows, http, task

log = logging.getLogger(__name__)

#: The tenant-wide counter of distinct pages scraped.
PAGES_SCRAPED = "pages-scraped"

#: ``<a`` then whitespace, any case: what the Rust twin counts as a link.
LINK = re.compile(rb"<[aA][ \t\n\f\r]")


@task
def run(job: Job, payload: Any) -> dict[str, Any]:
    """``{"url": ...}`` scrapes one page, ``{"pages": [...]}`` fans out,
    ``{"summarize": true}`` sums the pages' results up."""
    if not isinstance(payload, dict):
        raise Fail("bad-payload", f"expected an object, got {payload!r}")
    if isinstance(payload.get("url"), str):
        return scrape(payload["url"])
    if isinstance(payload.get("pages"), list):
        return fan_out(payload["pages"])
    if isinstance(payload.get("summarize"), bool):
        if not payload["summarize"]:
            raise Fail("`summarize: false` asks for nothing")
        return summarize(job)
    raise Fail(
        "bad-payload",
        'expected {"url": ...}, {"pages": [...]} or {"summarize": true}',
    )


def scrape(url: str) -> dict[str, Any]:
    """One page: fetch it, count its links, count it once tenant-wide."""
    resp = http.get(url)
    status = resp.status_code
    if status == 429 or 500 <= status <= 599:
        # Rate-limited or a server hiccup: worth another try later.
        raise Retry(f"{url} answered {status}")
    if not 200 <= status < 300:
        raise Fail(f"{url} answered {status}")
    links = count_links(resp.content)
    # Counted once per URL, atomically on the host: retries, duplicate
    # jobs and redeliveries after a crash add nothing.
    counters.incr_once(PAGES_SCRAPED, 1, f"scraped:{url}")
    pages_scraped = counters.get(PAGES_SCRAPED)
    log.info("%s: %d bytes, %d links", url, len(resp.content), links)
    return {
        "url": url,
        "bytes": len(resp.content),
        "links": links,
        "pages_scraped": pages_scraped,
    }


def fan_out(pages: list[Any]) -> dict[str, Any]:
    """One job per page, then the summary: started, not waited for."""
    if not pages:
        raise Fail("no pages to scrape")
    if not all(isinstance(url, str) for url in pages):
        raise Fail("bad-payload", "pages: expected a list of URLs")
    steps = [flows.step("scrape", {"url": url}) for url in pages]
    then = flows.step("scrape", {"summarize": True})
    started = flows.start(flows.chord(steps, then))
    log.info("started flow %s over %d pages", started.flow_id, len(pages))
    return {"flow_id": started.flow_id, "job_ids": list(started.job_ids)}


def summarize(job: Job) -> dict[str, Any]:
    """Every page's result, from the job context, summed up."""
    pages = job.results()
    return {
        "pages": len(pages),
        "bytes": sum(page["bytes"] for page in pages),
        "links": sum(page["links"] for page in pages),
        "urls": [page["url"] for page in pages],
    }


def count_links(html: bytes) -> int:
    """Counts ``<a`` followed by whitespace (any case): crude, but it needs
    no HTML parser."""
    return len(LINK.findall(html))
