"""The HTTP probe behind remote-mode health checks: one GET, a short timeout, a reason."""

import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException


@dataclass(frozen=True)
class ProbeResult:
    healthy: bool
    reason: str


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect (often to a login page) proves the server answers; following it
    could leave the configured host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def http_probe(url: str, *, timeout: float) -> ProbeResult:
    """GET `url`; any answer below 400 (redirects included) is healthy.

    The reason never repeats the URL, which may carry credentials.
    """
    request = urllib.request.Request(url, method="GET", headers={"User-Agent": "fetchml-plugin-health"})
    try:
        with _opener.open(request, timeout=timeout) as response:
            return ProbeResult(True, f"HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code < 400:
            return ProbeResult(True, f"HTTP {exc.code}")
        return ProbeResult(False, f"HTTP {exc.code}")
    except urllib.error.URLError as exc:
        return ProbeResult(False, f"unreachable: {_reason(exc.reason)}")
    except (TimeoutError, OSError, HTTPException, ValueError) as exc:
        return ProbeResult(False, f"unreachable: {_reason(exc)}")


def _reason(exc: object) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or exc.__class__.__name__
