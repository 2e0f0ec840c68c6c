"""Fetch a query image by URL, for servers started with --allow-url-queries (off by default: SSRF).

Guards: http and https only; the host must not resolve to a loopback, private, link-local,
multicast or reserved address (unless RETRIEVAL_URL_ALLOW_PRIVATE is set, e.g. for an intranet);
redirects are not followed (they could lead to another scheme or an internal host); the body is
read in chunks up to the upload limit (too_large beyond); the whole fetch has a deadline.
Known limit: the address is checked before the request and resolved again by the HTTP client, so
a DNS answer that changes in between (rebinding) is not caught; put a proxy in front if that matters.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from urllib.parse import urlsplit

from retrieval.errors import RetrievalError


def is_url(ref: str) -> bool:
    return ref.lower().startswith(("http://", "https://")) or "://" in ref[:16]


def _check_host(host: str, port: int, allow_private: bool) -> None:
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise RetrievalError("the URL's host cannot be resolved", "invalid") from None
    for info in infos:
        if not allow_private and not _is_public(ipaddress.ip_address(info[4][0].split("%")[0])):
            raise RetrievalError("the URL points to a private or local address", "invalid")


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable, also for IPv4 wrapped in IPv6 (mapped, NAT64, 6to4) and CGNAT (100.64/10)."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return _is_public(addr.ipv4_mapped)
        if addr in _NAT64:
            return _is_public(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        if addr.sixtofour is not None:
            return _is_public(addr.sixtofour)
    return addr.is_global and not addr.is_multicast


def fetch_image_url(url: str, max_bytes: int, timeout_s: float, allow_private: bool) -> bytes:
    """The bytes at `url`, or a RetrievalError with a stable message. Runs in a worker thread."""
    import httpx

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RetrievalError("only http and https URLs are accepted", "invalid")
    if not parts.hostname:
        raise RetrievalError("the URL has no host", "invalid")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise RetrievalError("the URL has an invalid port", "invalid") from None
    _check_host(parts.hostname, port, allow_private)
    deadline = time.monotonic() + timeout_s
    try:
        with httpx.Client(follow_redirects=False, timeout=timeout_s, trust_env=False) as client:
            with client.stream("GET", url, headers={"Accept": "image/*"}) as response:
                if response.is_redirect:
                    raise RetrievalError("the URL redirects; redirects are not followed", "invalid")
                if response.status_code != 200:
                    raise RetrievalError(f"the URL answered HTTP {response.status_code}", "invalid")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise RetrievalError(f"upload too large: the limit is {max_bytes} bytes", "too_large")
                chunks, size = [], 0
                # No chunk size: decoded data is yielded as it arrives, so a slow drip meets the deadline.
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise RetrievalError(f"upload too large: the limit is {max_bytes} bytes", "too_large")
                    if time.monotonic() > deadline:
                        raise RetrievalError("fetching the URL timed out", "timeout")
                    chunks.append(chunk)
    except httpx.TimeoutException:
        raise RetrievalError("fetching the URL timed out", "timeout") from None
    except httpx.HTTPError:
        raise RetrievalError("the URL cannot be fetched", "invalid") from None
    return b"".join(chunks)
