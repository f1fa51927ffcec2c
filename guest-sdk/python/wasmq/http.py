"""Blocking outbound HTTP over ``wasi:http/outgoing-handler``, requests-like.

::

    resp = http.post(url, json={"to": user_id}, timeout=10)
    resp.raise_for_status()
    data = resp.json()

Each call sends one request and reads the whole response body into memory.
The host decides which destinations a task may reach (deny by default, an
allow-list in the task's policy): a refused destination raises
:class:`Denied` (a :class:`wasmq.Denied`; uncaught, kind ``"denied"``).
Connection failures raise :class:`ConnectionError` and timeouts
:class:`Timeout` (uncaught, kind ``"network"``, which a retry policy can
list among its auto-retry kinds). HTTP error statuses are not errors until
:meth:`Response.raise_for_status` makes them :class:`HTTPError` (uncaught,
kind ``"http"``).

Redirects (301, 302, 303, 307, 308 with a ``location``) are followed, up to
:data:`MAX_REDIRECTS`, as the Rust SDK does: 303, and 301 or 302 after a
POST, continue as a GET without a body; 307 and 308 repeat the method and
body; ``authorization``, ``cookie`` and ``proxy-authorization`` are not
sent on to another origin; every hop is checked against the allow-list.

Requests made inside a step (:func:`wasmq.once`) carry the step's
idempotency token as ``Idempotency-Key`` (added by the host unless the
request sets its own).
"""

from __future__ import annotations

import json as _json
import urllib.parse
from typing import Any, Dict, Iterable, Iterator, List, Mapping, MutableMapping, Optional, Tuple, Union

from componentize_py_types import Err
from wit_world.imports import outgoing_handler
from wit_world.imports import streams
from wit_world.imports import wasi_http_types as wh
from wit_world.imports import wasmq_task_types_0_1_0 as wit

from .errors import DENIED, NETWORK, Denied as _HostDenied, Duration, TaskError, to_millis

__all__ = [
    "get", "post", "put", "patch", "delete", "head", "request",
    "Response", "CaseInsensitiveDict",
    "RequestException", "ConnectionError", "Timeout", "HTTPError", "InvalidRequest", "Denied",
    "MAX_REDIRECTS",
]

#: Bytes asked for per read of the response body.
READ_CHUNK = 64 * 1024
#: Most bytes ``blocking-write-and-flush`` accepts per call (WASI limit).
WRITE_CHUNK = 4096
#: Most redirects followed for one call (bounds a redirect loop quickly).
MAX_REDIRECTS = 5
_CREDENTIAL_HEADERS = ("authorization", "cookie", "proxy-authorization")

Headers = Union[Mapping[str, str], Iterable[Tuple[str, str]], None]


# ---- errors -------------------------------------------------------------


class RequestException(TaskError):
    """An HTTP request produced no usable response. Uncaught: kind ``"http"``."""

    def __init__(self, message: str, response: Optional["Response"] = None) -> None:
        super().__init__(message)
        #: The response, for :class:`HTTPError`.
        self.response = response

    def to_wit(self) -> wit.TaskError:
        """Kind ``"http"``: the retry policy decides."""
        return wit.TaskError_Kind(wit.KindedError("http", self.message))


class ConnectionError(RequestException):  # noqa: A001 - the requests name
    """DNS failure, refused or dropped connection. Uncaught: kind ``"network"``."""

    def to_wit(self) -> wit.TaskError:
        """Kind ``"network"``."""
        return wit.TaskError_Kind(wit.KindedError(NETWORK, self.message))


class Timeout(RequestException):
    """The connection or the response timed out. Uncaught: kind ``"network"``."""

    def to_wit(self) -> wit.TaskError:
        """Kind ``"network"``."""
        return wit.TaskError_Kind(wit.KindedError(NETWORK, self.message))


class InvalidRequest(RequestException):
    """The request itself is malformed (URL, method, header). Uncaught: a
    permanent failure: sending it again cannot help."""

    def to_wit(self) -> wit.TaskError:
        """``fail``."""
        return wit.TaskError_Fail(self.message)


class Denied(RequestException, _HostDenied):
    """The host refused the destination (not on the task's allow-list).
    Also a :class:`wasmq.Denied`. Uncaught: kind ``"denied"``."""

    def to_wit(self) -> wit.TaskError:
        """Kind ``"denied"``."""
        return wit.TaskError_Kind(wit.KindedError(DENIED, self.message))


class HTTPError(RequestException):
    """A 4xx or 5xx status, raised by :meth:`Response.raise_for_status`."""


# ---- responses ----------------------------------------------------------


class CaseInsensitiveDict(MutableMapping[str, str]):
    """Headers: a dict whose keys match whatever their case."""

    def __init__(self, data: Headers = None) -> None:
        self._store: Dict[str, Tuple[str, str]] = {}
        if data is not None:
            items = data.items() if isinstance(data, Mapping) else data
            for k, v in items:
                self[k] = v

    def __setitem__(self, key: str, value: str) -> None:
        self._store[key.lower()] = (key, value)

    def __getitem__(self, key: str) -> str:
        return self._store[key.lower()][1]

    def __delitem__(self, key: str) -> None:
        del self._store[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._store.values())

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


class Response:
    """A complete HTTP response."""

    def __init__(self, status_code: int, headers: List[Tuple[str, str]], content: bytes, url: str) -> None:
        #: Status code (200, 404, ...).
        self.status_code = status_code
        #: Headers, case-insensitive; repeated headers joined with ", ".
        self.headers = CaseInsensitiveDict()
        for name, value in headers:
            self.headers[name] = f"{self.headers[name]}, {value}" if name in self.headers else value
        #: The whole body.
        self.content = content
        #: The URL of the final response (after redirects).
        self.url = url

    @property
    def ok(self) -> bool:
        """True unless the status is 4xx or 5xx (as in requests)."""
        return self.status_code < 400

    @property
    def encoding(self) -> str:
        """The charset the ``content-type`` names, else UTF-8."""
        ctype = self.headers.get("content-type", "")
        for part in ctype.split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                return value.strip('"')
        return "utf-8"

    @property
    def text(self) -> str:
        """The body decoded (invalid bytes replaced)."""
        try:
            return self.content.decode(self.encoding, errors="replace")
        except LookupError:
            return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON; :class:`RequestException` if it is not."""
        try:
            return _json.loads(self.content)
        except ValueError as e:
            raise RequestException(f"response body (status {self.status_code}) is not JSON: {e}", self) from None

    def raise_for_status(self) -> None:
        """Raise :class:`HTTPError` for a 4xx or 5xx status."""
        if 400 <= self.status_code < 600:
            side = "Client" if self.status_code < 500 else "Server"
            raise HTTPError(f"{self.status_code} {side} Error for url: {self.url}", self)

    def __repr__(self) -> str:
        return f"<Response [{self.status_code}]>"


# ---- the calls ----------------------------------------------------------


def get(url: str, *, params: Any = None, headers: Headers = None, timeout: Optional[Duration] = None) -> Response:
    """``GET url`` (``params`` added to the query string)."""
    return request("GET", url, params=params, headers=headers, timeout=timeout)


def head(url: str, **kwargs: Any) -> Response:
    """``HEAD url``."""
    return request("HEAD", url, **kwargs)


def post(url: str, *, json: Any = None, data: Any = None, **kwargs: Any) -> Response:
    """``POST url`` with a ``json`` or ``data`` body."""
    return request("POST", url, json=json, data=data, **kwargs)


def put(url: str, *, json: Any = None, data: Any = None, **kwargs: Any) -> Response:
    """``PUT url`` with a ``json`` or ``data`` body."""
    return request("PUT", url, json=json, data=data, **kwargs)


def patch(url: str, *, json: Any = None, data: Any = None, **kwargs: Any) -> Response:
    """``PATCH url`` with a ``json`` or ``data`` body."""
    return request("PATCH", url, json=json, data=data, **kwargs)


def delete(url: str, **kwargs: Any) -> Response:
    """``DELETE url``."""
    return request("DELETE", url, **kwargs)


def request(
    method: str,
    url: str,
    *,
    params: Any = None,
    headers: Headers = None,
    json: Any = None,
    data: Any = None,
    timeout: Optional[Duration] = None,
) -> Response:
    """Send ``method url``, follow redirects, read the whole final response.

    ``params``: a dict or pairs added to the query string. ``json``: a body
    JSON-encoded with ``content-type: application/json``. ``data``: bytes or
    str as they are, or a dict or pairs form-encoded. ``timeout`` (seconds
    or a timedelta) bounds connecting, the first response byte and each gap
    between bytes. ``url`` is ``http://`` or ``https://``.
    """
    header_list: List[Tuple[str, str]] = list(CaseInsensitiveDict(headers).items())
    body = b""
    if json is not None and data is not None:
        raise InvalidRequest("give a request body as json= or data=, not both")
    if json is not None:
        try:
            body = _json.dumps(json, separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"request body does not serialize to JSON: {e}") from None
        _default_header(header_list, "content-type", "application/json")
    elif isinstance(data, (bytes, bytearray, memoryview)):
        body = bytes(data)
    elif isinstance(data, str):
        body = data.encode("utf-8")
    elif data is not None:
        body = urllib.parse.urlencode(data, doseq=True).encode("ascii")
        _default_header(header_list, "content-type", "application/x-www-form-urlencoded")
    if params:
        query = urllib.parse.urlencode(params, doseq=True)
        base, _, fragment = url.partition("#")
        url = f"{base}{'&' if '?' in base else '?'}{query}"
    return _follow(method.upper(), url, header_list, body, to_millis(timeout))


def _default_header(headers: List[Tuple[str, str]], name: str, value: str) -> None:
    if not any(n.lower() == name for n, _ in headers):
        headers.append((name, value))


def _follow(method: str, url: str, headers: List[Tuple[str, str]], body: bytes, timeout_ms: Optional[int]) -> Response:
    first = f"{method} {url}"
    for hop in range(MAX_REDIRECTS + 1):
        what = first if hop == 0 else f"{first} (redirected to {method} {url})"
        try:
            resp = _send(method, url, headers, body, timeout_ms)
        except RequestException as e:
            raise type(e)(f"{what}: {e.message}") from None
        location = _redirect_location(resp)
        if location is None:
            return resp
        if hop == MAX_REDIRECTS:
            raise RequestException(f"{what}: more than {MAX_REDIRECTS} redirects (the last to {location})", resp)
        try:
            nxt = _resolve_location(url, location)
        except RequestException as e:
            raise type(e)(f"{what}: {e.message}") from None
        if not _same_origin(url, nxt):
            headers = [(n, v) for n, v in headers if n.lower() not in _CREDENTIAL_HEADERS]
        as_get = resp.status_code == 303 or (resp.status_code in (301, 302) and method == "POST")
        if as_get and method != "HEAD":
            method = "GET"
            body = b""
            headers = [(n, v) for n, v in headers if n.lower() not in ("content-type", "content-length")]
        url = nxt
    raise AssertionError("the loop returns by its last hop")


def _redirect_location(resp: Response) -> Optional[str]:
    if resp.status_code in (301, 302, 303, 307, 308):
        location = resp.headers.get("location", "")
        return location or None
    return None


def _resolve_location(base: str, location: str) -> str:
    """``location`` made absolute against ``base`` (RFC 3986 reference forms)."""
    location = location.strip()
    scheme, sep, _ = location.partition("://")
    if sep and scheme and all(c.isalnum() or c in "+-." for c in scheme):
        return location
    base_scheme, sep, rest = base.partition("://")
    if not sep:
        raise InvalidRequest(f"URL {base!r}: expected http:// or https://")
    if location.startswith("//"):
        return f"{base_scheme}:{location}"
    rest = rest.split("#", 1)[0]
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path_query = rest[:end], rest[end:]
    path = path_query.split("?", 1)[0]
    origin = f"{base_scheme}://{authority}"
    if location.startswith("/"):
        return f"{origin}{location}"
    if location.startswith("?"):
        return f"{origin}{path or '/'}{location}"
    directory = path[: path.rfind("/") + 1] or "/"
    return f"{origin}{directory}{location}"


def _same_origin(a: str, b: str) -> bool:
    def origin(u: str) -> str:
        scheme, _, rest = u.partition("://")
        end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        return f"{scheme}://{rest[:end]}".lower()

    return origin(a) == origin(b)


def _target(url: str) -> Tuple[wh.Scheme, str, str]:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise InvalidRequest(f"URL {url!r}: expected http:// or https://")
    if scheme.lower() == "http":
        wscheme: wh.Scheme = wh.Scheme_Http()
    elif scheme.lower() == "https":
        wscheme = wh.Scheme_Https()
    else:
        raise InvalidRequest(f"URL {url!r}: only http and https are supported")
    rest = rest.split("#", 1)[0]
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:end], rest[end:]
    if not authority:
        raise InvalidRequest(f"URL {url!r}: no host")
    if not path:
        path = "/"
    elif path.startswith("?"):
        path = "/" + path
    return wscheme, authority, path


_METHODS = {
    "GET": wh.Method_Get, "HEAD": wh.Method_Head, "POST": wh.Method_Post, "PUT": wh.Method_Put,
    "DELETE": wh.Method_Delete, "CONNECT": wh.Method_Connect, "OPTIONS": wh.Method_Options,
    "TRACE": wh.Method_Trace, "PATCH": wh.Method_Patch,
}


def _method(method: str) -> wh.Method:
    known = _METHODS.get(method)
    return known() if known is not None else wh.Method_Other(method)


def _send(method: str, url: str, headers: List[Tuple[str, str]], body: bytes, timeout_ms: Optional[int]) -> Response:
    scheme, authority, path = _target(url)
    try:
        fields = wh.Fields.from_list([(n, v.encode("utf-8")) for n, v in headers])
    except Err as e:
        raise InvalidRequest(f"headers rejected: {type(e.value).__name__}") from None
    req = wh.OutgoingRequest(fields)
    for setter, value, what in (
        (req.set_method, _method(method), "method"),
        (req.set_scheme, scheme, "scheme"),
        (req.set_authority, authority, "host"),
        (req.set_path_with_query, path, "path"),
    ):
        try:
            setter(value)
        except Err:
            raise InvalidRequest(f"{what} rejected") from None
    options = None
    if timeout_ms is not None:
        ns = timeout_ms * 1_000_000
        options = wh.RequestOptions()
        for set_timeout in (options.set_connect_timeout, options.set_first_byte_timeout, options.set_between_bytes_timeout):
            try:
                set_timeout(ns)
            except Err:
                pass  # the host does not support this timeout: its own applies
    # Take the body handle before sending (the request moves into `handle`);
    # write the body after, so the host is already consuming it.
    try:
        out_body = req.body()
    except Err:
        raise InvalidRequest("body rejected") from None
    try:
        pending = outgoing_handler.handle(req, options)
    except Err as e:
        raise _from_code(e.value) from None
    write_error = _write_body(out_body, body)
    finish_error: Optional[RequestException] = None
    try:
        wh.OutgoingBody.finish(out_body, None)
    except Err as e:
        finish_error = _from_code(e.value)
    with pending:
        with pending.subscribe() as ready:
            ready.block()
        got = pending.get()
    if got is None or isinstance(got, Err):
        raise RequestException("response future misbehaved")
    inner = got.value
    if isinstance(inner, Err):
        raise _from_code(inner.value)
    # A failed body write usually shows as a failed response, reported above
    # with its real cause; if not, report the write failure.
    if write_error is not None:
        raise write_error
    if finish_error is not None:
        raise finish_error
    with inner.value as resp:
        status = resp.status()
        with resp.headers() as fields_in:
            entries = [(n, v.decode("utf-8", errors="replace")) for n, v in fields_in.entries()]
        try:
            incoming = resp.consume()
        except Err:
            raise RequestException("response body already consumed") from None
        content = _read_body(incoming)
        # The trailers are not needed; finishing the body releases it.
        with wh.IncomingBody.finish(incoming):
            pass
    return Response(status, entries, content, url)


def _write_body(out_body: wh.OutgoingBody, body: bytes) -> Optional[RequestException]:
    try:
        stream = out_body.write()
    except Err:
        return RequestException("request body stream unavailable")
    # The stream is a child of the body and must be dropped before `finish`.
    with stream:
        for i in range(0, len(body), WRITE_CHUNK):
            try:
                stream.blocking_write_and_flush(body[i : i + WRITE_CHUNK])
            except Err as e:
                return _from_stream(e.value)
    return None


def _read_body(incoming: wh.IncomingBody) -> bytes:
    try:
        stream = incoming.stream()
    except Err:
        raise RequestException("response body stream unavailable") from None
    chunks: List[bytes] = []
    # The stream is a child of the body and must go first.
    with stream:
        while True:
            try:
                chunks.append(stream.blocking_read(READ_CHUNK))
            except Err as e:
                if isinstance(e.value, streams.StreamError_Closed):
                    break
                raise _from_stream(e.value) from None
    return b"".join(chunks)


_DENIED_CODES = (wh.ErrorCode_HttpRequestDenied, wh.ErrorCode_DestinationIpProhibited)
_TIMEOUT_CODES = (
    wh.ErrorCode_DnsTimeout, wh.ErrorCode_ConnectionTimeout, wh.ErrorCode_ConnectionReadTimeout,
    wh.ErrorCode_ConnectionWriteTimeout, wh.ErrorCode_HttpResponseTimeout,
)
_NETWORK_CODES = (
    wh.ErrorCode_DnsError, wh.ErrorCode_DestinationNotFound, wh.ErrorCode_DestinationUnavailable,
    wh.ErrorCode_DestinationIpUnroutable, wh.ErrorCode_ConnectionRefused, wh.ErrorCode_ConnectionTerminated,
    wh.ErrorCode_ConnectionLimitReached, wh.ErrorCode_HttpResponseIncomplete,
)
_INVALID_CODES = (
    wh.ErrorCode_HttpRequestLengthRequired, wh.ErrorCode_HttpRequestBodySize,
    wh.ErrorCode_HttpRequestMethodInvalid, wh.ErrorCode_HttpRequestUriInvalid,
    wh.ErrorCode_HttpRequestUriTooLong, wh.ErrorCode_HttpRequestHeaderSectionSize,
    wh.ErrorCode_HttpRequestHeaderSize, wh.ErrorCode_HttpRequestTrailerSectionSize,
    wh.ErrorCode_HttpRequestTrailerSize,
)


def _describe(code: Any) -> str:
    name = type(code).__name__.removeprefix("ErrorCode_")
    payload = getattr(code, "value", None)
    return name if payload is None else f"{name}({payload!r})"


def _from_code(code: Any) -> RequestException:
    """The exception for a wasi-http ``error-code`` (see the module docs)."""
    message = _describe(code)
    if isinstance(code, _DENIED_CODES):
        return Denied(message)
    if isinstance(code, _TIMEOUT_CODES):
        return Timeout(message)
    if isinstance(code, _NETWORK_CODES):
        return ConnectionError(message)
    if isinstance(code, _INVALID_CODES):
        return InvalidRequest(message)
    return RequestException(message)


def _from_stream(err: Any) -> RequestException:
    """The exception for a body stream failure, by the HTTP error behind it."""
    if isinstance(err, streams.StreamError_Closed):
        return ConnectionError("stream closed early")
    io_error = err.value
    code = wh.http_error_code(io_error)
    if code is not None:
        return _from_code(code)
    return ConnectionError(io_error.to_debug_string())
