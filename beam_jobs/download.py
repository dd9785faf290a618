"""Fetch images over HTTP(S) for the URL sources (CC3M / CC12M-style TSVs, URL manifests).

:func:`fetch` downloads one URL with the standard library (``urllib.request``):

* only ``http`` and ``https`` URLs, also after redirects (no ``file://``, ``ftp://``, ...);
* a per-request ``timeout`` in seconds, for connecting, for each read and for the whole
  response body (so a server dripping one byte a second cannot hold a worker forever);
* retries with exponential backoff (``backoff * 2**attempt``, capped, with a little jitter) for
  timeouts, connection errors, HTTP 429 and HTTP 5xx; never for other 4xx answers;
* a byte cap: a ``Content-Length`` above ``max_bytes`` is refused before reading, and a body
  without one stops being read once it passes the cap;
* a configurable ``User-Agent`` header.

It raises :class:`DownloadError` whose ``reason`` is one of the records' download reasons
(``DOWNLOAD_TIMEOUT``, ``DOWNLOAD_HTTP_ERROR`` with ``HTTP <status>`` in the detail,
``DOWNLOAD_TOO_LARGE``, ``DOWNLOAD_ERROR``). :class:`DownloadImages` is the Beam DoFn around it:
candidate with a URL in ``image_uri`` -> the same candidate with ``image_bytes``, or a dead letter.
Beam metrics (namespace ``kmm``): ``downloads``, ``download_ok``, ``download_retries``,
``download_bytes`` (distribution).
"""

from __future__ import annotations

import dataclasses
import http.client
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from keras_mm.beam_jobs import records as rec

SCHEMES = ("http", "https")
DEFAULT_USER_AGENT = "keras-mm-image-text/0.1 (dataset builder; python-urllib)"
_CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True)
class DownloadOptions:
    """How :func:`fetch` downloads.

    timeout: seconds per request (connect, each read, and the whole body).
    retries: extra attempts after the first, for retryable failures only.
    max_bytes: largest accepted body; larger ones are ``DOWNLOAD_TOO_LARGE``.
    user_agent: the ``User-Agent`` header sent.
    backoff: seconds before the first retry; doubles each retry, at most ``max_backoff``.
    """

    timeout: float = 10.0
    retries: int = 3
    max_bytes: int = 32 * 2**20
    user_agent: str = DEFAULT_USER_AGENT
    backoff: float = 0.5
    max_backoff: float = 30.0

    def __post_init__(self):
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {self.max_bytes}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0")


class DownloadError(Exception):
    """A URL could not be fetched; ``reason`` is one of the records' DOWNLOAD_* reasons."""

    def __init__(self, reason: str, detail: str, attempts: int = 1):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.attempts = attempts


class _Retryable(Exception):
    """A failure worth another attempt; becomes a DownloadError when attempts run out."""

    def __init__(self, reason: str, detail: str, retry_after: Optional[float] = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http(s) URLs (urllib alone would also follow ftp://)."""

    @staticmethod
    def _check(newurl: str, fp=None) -> None:
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in SCHEMES:
            if fp is not None:
                fp.close()
            raise DownloadError(rec.DOWNLOAD_ERROR,
                                f"redirect to unsupported scheme {scheme!r}: {newurl[:200]}")

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:  # checked before urllib's own check, which would call it an HTTP error
            self._check(urllib.parse.urljoin(req.full_url, location), fp)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self._check(newurl, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def build_opener() -> urllib.request.OpenerDirector:
    """The urllib opener :func:`fetch` uses (proxies from the environment are honoured)."""
    return urllib.request.build_opener(_HttpOnlyRedirects())


def check_url(url: str) -> None:
    """Raise ``DownloadError(DOWNLOAD_ERROR)`` unless ``url`` is an http(s) URL with a host."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise DownloadError(rec.DOWNLOAD_ERROR, f"bad URL {url[:200]!r}: {e}") from e
    if parts.scheme.lower() not in SCHEMES:
        raise DownloadError(rec.DOWNLOAD_ERROR,
                            f"unsupported URL scheme {parts.scheme!r} (only http, https): "
                            f"{url[:200]}")
    if not parts.hostname:
        raise DownloadError(rec.DOWNLOAD_ERROR, f"URL without a host: {url[:200]!r}")


def _retry_after(headers) -> Optional[float]:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date; the exponential backoff will do
        return None


def _is_timeout(error: BaseException) -> bool:
    return isinstance(error, TimeoutError) or "timed out" in str(error).lower()


def _fetch_once(url: str, options: DownloadOptions, opener) -> bytes:
    request = urllib.request.Request(url, headers={
        "User-Agent": options.user_agent, "Accept": "image/*,*/*;q=0.5"})
    deadline = time.monotonic() + options.timeout
    try:
        response = opener.open(request, timeout=options.timeout)
    except urllib.error.HTTPError as e:
        code, headers = e.code, e.headers
        e.close()
        if code == 429 or 500 <= code <= 599:
            raise _Retryable(rec.DOWNLOAD_HTTP_ERROR, f"HTTP {code}", _retry_after(headers))
        raise DownloadError(rec.DOWNLOAD_HTTP_ERROR, f"HTTP {code} {e.reason}") from None
    except urllib.error.URLError as e:
        if _is_timeout(e.reason if isinstance(e.reason, BaseException) else e):
            raise _Retryable(rec.DOWNLOAD_TIMEOUT, f"timed out after {options.timeout}s") from None
        if isinstance(e.reason, OSError):  # refused, reset, DNS failure, TLS error
            raise _Retryable(rec.DOWNLOAD_ERROR,
                             f"{type(e.reason).__name__}: {e.reason}") from None
        raise DownloadError(rec.DOWNLOAD_ERROR, f"URLError: {e.reason}") from None
    except (TimeoutError, OSError, http.client.HTTPException) as e:
        if _is_timeout(e):
            raise _Retryable(rec.DOWNLOAD_TIMEOUT, f"timed out after {options.timeout}s") from None
        raise _Retryable(rec.DOWNLOAD_ERROR, f"{type(e).__name__}: {e}") from None
    except ValueError as e:  # urllib's "unknown url type" and friends
        raise DownloadError(rec.DOWNLOAD_ERROR, f"bad URL: {e}") from None

    with response:
        length = response.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > options.max_bytes:
            raise DownloadError(rec.DOWNLOAD_TOO_LARGE,
                                f"Content-Length {int(length)} > {options.max_bytes} bytes")
        chunks, size = [], 0
        try:
            while True:
                if time.monotonic() > deadline:
                    raise _Retryable(rec.DOWNLOAD_TIMEOUT,
                                     f"body not complete after {options.timeout}s")
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > options.max_bytes:
                    raise DownloadError(rec.DOWNLOAD_TOO_LARGE,
                                        f"body passed {options.max_bytes} bytes")
                chunks.append(chunk)
        except (TimeoutError, OSError, http.client.HTTPException) as e:
            if _is_timeout(e):
                raise _Retryable(rec.DOWNLOAD_TIMEOUT,
                                 f"read timed out after {options.timeout}s") from None
            raise _Retryable(rec.DOWNLOAD_ERROR, f"{type(e).__name__}: {e}") from None
    return b"".join(chunks)


def fetch(url: str, options: DownloadOptions = DownloadOptions(), *, opener=None,
          sleep: Callable[[float], None] = time.sleep,
          on_retry: Optional[Callable[[], None]] = None) -> bytes:
    """Download one http(s) URL; returns the body. Raises :class:`DownloadError`."""
    check_url(url)
    opener = opener or build_opener()
    attempt = 0
    while True:
        try:
            return _fetch_once(url, options, opener)
        except _Retryable as e:
            if attempt >= options.retries:
                raise DownloadError(e.reason, f"{e.detail} (after {attempt + 1} attempts)",
                                    attempt + 1) from None
            delay = min(options.max_backoff, options.backoff * 2**attempt)
            if e.retry_after is not None:
                delay = min(options.max_backoff, max(delay, e.retry_after))
            attempt += 1
            if on_retry is not None:
                on_retry()
            sleep(delay * random.uniform(1.0, 1.1))


class DownloadImages(beam.DoFn):
    """Candidate with an http(s) URL in ``image_uri`` -> candidate with ``image_bytes``.

    Failures leave on the tagged ``dead_letters`` output with a DOWNLOAD_* reason.
    """

    def __init__(self, options: DownloadOptions = DownloadOptions()):
        self._options = options
        self._downloads = Metrics.counter(rec.METRICS_NAMESPACE, "downloads")
        self._ok = Metrics.counter(rec.METRICS_NAMESPACE, "download_ok")
        self._retries = Metrics.counter(rec.METRICS_NAMESPACE, "download_retries")
        self._bytes = Metrics.distribution(rec.METRICS_NAMESPACE, "download_bytes")
        self._opener = None

    def setup(self):
        self._opener = build_opener()

    def process(self, candidate: rec.Candidate):
        url = candidate.image_uri or ""
        self._downloads.inc()
        try:
            data = fetch(url, self._options, opener=self._opener or build_opener(),
                         on_retry=self._retries.inc)
        except DownloadError as e:
            yield rec.dead_letter(candidate.id, candidate.source or url, e.reason, e.detail)
            return
        self._ok.inc()
        self._bytes.update(len(data))
        yield dataclasses.replace(candidate, image_bytes=data, image_uri=None,
                                  source=candidate.source or url)
