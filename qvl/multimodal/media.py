"""Resolve image and video sources, optionally under a safety policy.

Owns: turning what a user hands us into bytes or a checked local path (fetch_bytes), or a frame list
(video_source). Opening the result is image_file.py's (images: PIL) and video.py's (PyAV) job. Knows
nothing about resizing, normalisation or tokens (image.py, video.py, budget.py).

Sources accepted for both kinds:
  * a local path (str or os.PathLike) or a `file://` URL (`file:///abs`, `file://localhost/abs`, or
    qwen-vl-utils' `file://relative`); percent-escapes are decoded when the literal path does not exist
    (a refusal by the policy never depends on what exists: it is decided first, for both spellings);
  * a `data:` URL (`;base64,` or percent-encoded payload);
  * raw bytes (bytes, bytearray, memoryview);
  * an `http://` / `https://` URL, downloaded with httpx: per-operation timeout plus an overall deadline,
    a byte cap, a redirect cap; redirects are followed by hand so every hop is checked again;
  * images only: a PIL image (used as is) or a uint8 numpy array (H, W[, C]);
  * videos only: a list/tuple of frames (each one of the image sources), returned unchanged.
Any other `scheme://` (ftp, gopher, s3, ...) is refused.

MediaPolicy (policy=None is the permissive library default: local files and any http(s) host; the
default timeout / byte / redirect limits still apply). With a policy:
  * http(s) hosts are resolved first and every address must be public: loopback, private, link-local,
    multicast, reserved, unspecified, shared (CGNAT), IPv4-mapped / NAT64 forms of those and the cloud
    metadata addresses are refused, on the first hop and after every redirect. The request is then sent
    to the checked address (Host header and TLS SNI keep the name), so DNS cannot change in between;
    environment proxies are ignored. `allow_private_addresses=True` turns the address check off.
  * `allowed_media_domains` (optional): an allow-list of host names, exact or `*.example.com`.
  * local paths and `file://` are allowed only when `allowed_local_media_path` is set, and only for
    regular files whose real path (symlinks resolved) lies under it.

Images open (image_file.open_image) with a safe list of Pillow formats (no EPS/Ghostscript), a
decompression-bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`) and their EXIF orientation applied; videos
with an allow-list of FFmpeg demuxers and only the `file`
protocol (video.open_container), so a crafted playlist cannot make FFmpeg read other files or the network.

Errors: every failure is a ValueError whose message starts with the item's label ("image 2: ...").
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any


_METADATA_ADDRESSES = {ipaddress.ip_address(a) for a in
                       ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass
class MediaPolicy:
    """Where media may come from. See the module docstring for what each field allows."""

    # The metadata is the qvl serve flags' help (qvl.config.add_dataclass_args); "flag" keeps their spelling.
    allowed_local_media_path: str | None = field(default=None, metadata={
        "help": "allow file:// URLs and paths under this directory (default: none)", "metavar": "DIR"})
    allowed_media_domains: list[str] | None = field(default=None, metadata={
        "help": "only fetch http(s) media from these hosts: exact, or *.example.com (default: any public host)",
        "metavar": "DOMAIN[,DOMAIN]"})
    allow_private_addresses: bool = field(default=False, metadata={"flag": "--allow-private-media-addresses",
        "help": "allow http(s) media on loopback/private/link-local addresses (unsafe)"})
    timeout_s: float = field(default=10.0, metadata={"flag": "--media-timeout", "help": "seconds per download"})
    max_bytes: int = field(default=64 * 1024 * 1024, metadata={"flag": "--media-max-bytes",
                                                               "help": "bytes per media download"})
    max_redirects: int = field(default=5, metadata={"flag": "--media-max-redirects",
                                                    "help": "redirects followed per media download"})

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"MediaPolicy.timeout_s must be > 0, got {self.timeout_s}")
        if self.max_bytes <= 0:
            raise ValueError(f"MediaPolicy.max_bytes must be > 0, got {self.max_bytes}")
        if self.max_redirects < 0:
            raise ValueError(f"MediaPolicy.max_redirects must be >= 0, got {self.max_redirects}")


_DEFAULT_LIMITS = MediaPolicy()


def _fail(label: str, msg: str) -> ValueError:
    return ValueError(f"{label}: {msg}")


def _short(s: str, n: int = 120) -> str:
    return s if len(s) <= n else s[:n] + "..."


# ---------------------------------------------------------------------------------------------- bytes

def fetch_bytes(source: Any, *, policy: MediaPolicy | None = None, label: str = "media") -> bytes | str:
    """Resolve a non-PIL source to bytes (URLs, data:, raw bytes) or a checked local path (str)."""
    limits = policy or _DEFAULT_LIMITS
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise _fail(label, "empty data (0 bytes)")
        return data
    if isinstance(source, os.PathLike):
        return local_path(os.fspath(source), policy=policy, label=label)
    if not isinstance(source, str):
        raise _fail(label, f"unsupported source type {type(source).__name__}")
    if source.startswith("data:"):
        return _decode_data_url(source, limits.max_bytes, label)
    m = _URL_SCHEME.match(source)
    if m:
        scheme = m.group(1).lower()
        if scheme in ("http", "https"):
            return _download(source, policy, label)
        if scheme == "file":
            return local_path(_file_url_path(source), policy=policy, label=label)
        raise _fail(label, f"unsupported URL scheme {scheme!r} (use http(s)://, file://, data: or a path)")
    return local_path(source, policy=policy, label=label)


def _decode_data_url(url: str, max_bytes: int, label: str) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise _fail(label, "malformed data: URL (no ',' before the payload)")
    if header.lower().endswith(";base64"):
        if "%" in payload:
            payload = urllib.parse.unquote(payload)
        payload = re.sub(r"\s+", "", payload)
        if len(payload) // 4 * 3 > max_bytes:
            raise _fail(label, f"data: URL payload is about {len(payload) // 4 * 3} bytes, more than the "
                               f"limit {max_bytes}")
        padded = payload + "=" * (-len(payload) % 4)
        if "-" in padded or "_" in padded:  # the URL-safe alphabet
            padded = padded.translate(str.maketrans("-_", "+/"))
        try:
            data = base64.b64decode(padded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _fail(label, f"invalid base64 in data: URL ({e})") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
        if len(data) > max_bytes:
            raise _fail(label, f"data: URL payload is {len(data)} bytes, more than the limit {max_bytes}")
    if not data:
        raise _fail(label, "empty data: URL payload (0 bytes)")
    return data


# ---------------------------------------------------------------------------------------------- local

def _file_url_path(url: str) -> str:
    rest = url[7:]
    if rest.startswith("/"):
        return rest
    host, slash, path = rest.partition("/")
    if host.lower() == "localhost" and slash:
        return "/" + path
    return rest  # qwen-vl-utils compatibility: file://relative/path


def local_path(path: str, *, policy: MediaPolicy | None = None, label: str = "media") -> str:
    """Return the real path of a local regular file, checked against `policy.allowed_local_media_path`.

    A refusal never depends on what exists on disk (no existence oracle): it names the path as given and
    is decided before any lookup, for the literal and the percent-decoded spelling alike."""
    if not path:
        raise _fail(label, "empty path")
    spellings = [path] + ([urllib.parse.unquote(path)] if "%" in path else [])
    if policy is not None:
        if policy.allowed_local_media_path is None:
            raise _fail(label, f"local file {_short(path)!r} refused: local media is not allowed (set "
                               "allowed_local_media_path)")
        root = os.path.realpath(policy.allowed_local_media_path)
        if any(os.path.commonpath([root, os.path.realpath(p)]) != root for p in spellings):
            raise _fail(label, f"local file {_short(path)!r} refused: it resolves outside "
                               f"allowed_local_media_path {root!r}")
    real = os.path.realpath(next((p for p in spellings if os.path.exists(p)), path))
    if not os.path.exists(real):
        raise _fail(label, f"no such file {_short(path)!r}")
    if not os.path.isfile(real):
        raise _fail(label, f"{_short(path)!r} is not a regular file")
    return real


# ----------------------------------------------------------------------------------------------- http

def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not a public destination, or None if it is."""
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return address_problem(ip.ipv4_mapped)
        if ip in _NAT64:
            return address_problem(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    for kind in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, "is_" + kind):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:
        return "not a public address"
    return None


def _resolve(host: str, port: int, label: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise _fail(label, f"cannot resolve host {host!r} ({e})") from None
    addrs = []
    for info in infos:
        addr = info[4][0].split("%", 1)[0]  # drop an IPv6 zone id
        if addr not in addrs:
            addrs.append(addr)
    if not addrs:
        raise _fail(label, f"host {host!r} resolved to no address")
    return addrs


def _prepare_hop(url: str, policy: MediaPolicy | None, label: str) -> tuple[str, dict, dict]:
    """Check one hop; return (url to request, extra headers, httpx extensions)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _fail(label, f"malformed URL {_short(url)!r} ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _fail(label, f"unsupported URL scheme {scheme!r} in {_short(url)!r}")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise _fail(label, f"URL {_short(url)!r} has no host")
    if policy is None:
        return url, {}, {}
    if policy.allowed_media_domains is not None and not _domain_allowed(host, policy.allowed_media_domains):
        raise _fail(label, f"host {host!r} is not in allowed_media_domains")
    if policy.allow_private_addresses:
        return url, {}, {}
    port = port or (443 if scheme == "https" else 80)
    addrs = _resolve(host, port, label)
    for addr in addrs:
        problem = address_problem(ipaddress.ip_address(addr))
        if problem:
            raise _fail(label, f"URL {_short(url)!r} refused: host {host!r} resolves to {addr}, {problem}")
    pinned = addrs[0]
    netloc = f"[{pinned}]" if ":" in pinned else pinned
    if parts.port is not None:
        netloc += f":{parts.port}"
    host_header = parts.netloc.rsplit("@", 1)[-1]
    pinned_url = urllib.parse.urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    return pinned_url, {"Host": host_header}, extensions


def _domain_allowed(host: str, allowed: list[str]) -> bool:
    for entry in allowed:
        entry = entry.rstrip(".").lower()
        if entry.startswith("*."):
            if host.endswith(entry[1:]):
                return True
        elif host == entry:
            return True
    return False


def _download(url: str, policy: MediaPolicy | None, label: str) -> bytes:
    import httpx

    limits = policy or _DEFAULT_LIMITS
    deadline = time.monotonic() + limits.timeout_s
    try:
        with httpx.Client(timeout=limits.timeout_s, follow_redirects=False,
                          trust_env=policy is None) as client:
            for _ in range(limits.max_redirects + 1):
                if time.monotonic() > deadline:
                    raise _fail(label, f"GET {_short(url)!r}: took longer than {limits.timeout_s} s")
                target, headers, extensions = _prepare_hop(url, policy, label)
                with client.stream("GET", target, headers=headers, extensions=extensions) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        url = urllib.parse.urljoin(url, resp.headers["location"])
                        continue
                    if not 200 <= resp.status_code < 300:
                        raise _fail(label, f"GET {_short(url)!r} returned HTTP {resp.status_code}")
                    return _read_capped(resp, url, limits, deadline, label)
            raise _fail(label, f"GET {_short(url)!r}: more than {limits.max_redirects} redirects")
    except httpx.HTTPError as e:
        raise _fail(label, f"GET {_short(url)!r} failed: {type(e).__name__}: {e}") from None


def _read_capped(resp, url: str, limits: MediaPolicy, deadline: float, label: str) -> bytes:
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_bytes:
        raise _fail(label, f"GET {_short(url)!r}: {declared} bytes, more than the limit {limits.max_bytes}")
    buf = bytearray()
    for chunk in resp.iter_bytes():
        buf += chunk
        if len(buf) > limits.max_bytes:
            raise _fail(label, f"GET {_short(url)!r}: more than the limit of {limits.max_bytes} bytes")
        if time.monotonic() > deadline:
            raise _fail(label, f"GET {_short(url)!r}: download took longer than {limits.timeout_s} s")
    if not buf:
        raise _fail(label, f"GET {_short(url)!r}: empty response body")
    return bytes(buf)


# ---------------------------------------------------------------------------------------------- videos

def video_source(source: Any, *, policy: MediaPolicy | None = None,
                 label: str = "video") -> str | bytes | list:
    """Resolve a video source to a checked local path, the downloaded/decoded bytes, or a frame list."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise _fail(label, "empty frame list")
        return list(source)
    return fetch_bytes(source, policy=policy, label=label)
