"""media.py: every source kind, the MediaPolicy (SSRF, local paths, schemes), download limits."""
from __future__ import annotations

import base64
import http.server
import io
import ipaddress
import os
import threading
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from qvl.multimodal import media
from qvl.multimodal.image import process_image
from qvl.multimodal.image_file import open_image
from qvl.multimodal.media import MediaPolicy, address_problem, fetch_bytes

STRICT = MediaPolicy()


def _png_bytes(seed=0, size=(40, 30)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


PNG = _png_bytes()


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "root" / "a b.png"
    path.parent.mkdir()
    path.write_bytes(PNG)
    return path


# ------------------------------------------------------------------------------------ sources

def test_all_image_source_kinds_give_the_same_pixels(image_file):
    expected = process_image(PNG).content_hash
    pil = Image.open(io.BytesIO(PNG))
    sources = [
        str(image_file), image_file, f"file://{image_file}",
        "file://" + urllib.parse.quote(str(image_file)),
        "data:image/png;base64," + base64.b64encode(PNG).decode(),
        "data:image/png;base64," + base64.b64encode(PNG).decode().rstrip("=") + "\n",  # no padding
        "data:image/png;base64," + base64.urlsafe_b64encode(PNG).decode(),
        "data:image/png," + urllib.parse.quote_from_bytes(PNG),
        PNG, bytearray(PNG), memoryview(PNG), pil, np.asarray(pil.convert("RGB")),
    ]
    for src in sources:
        assert process_image(src).content_hash == expected, type(src)


def test_bad_sources():
    with pytest.raises(ValueError, match=r"^image 1: malformed data: URL"):
        open_image("data:image/png;base64", label="image 1")
    with pytest.raises(ValueError, match=r"^image 1: invalid base64"):
        open_image("data:image/png;base64,@@@@", label="image 1")
    with pytest.raises(ValueError, match=r"^image 1: empty data: URL"):
        open_image("data:image/png;base64,", label="image 1")
    with pytest.raises(ValueError, match=r"^image 1: no such file"):
        open_image("/nonexistent/x.png", label="image 1")
    with pytest.raises(ValueError, match=r"^image 1: .* is not a regular file"):
        open_image("/dev/zero", label="image 1")
    with pytest.raises(ValueError, match=r"^image 1: data: URL payload is about \d+ bytes, more than the limit"):
        open_image("data:image/png;base64," + base64.b64encode(PNG).decode(),
                   policy=MediaPolicy(max_bytes=10), label="image 1")


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://127.0.0.1:70/_x", "s3://b/k.png",
                                 "dict://127.0.0.1:11211/"])
@pytest.mark.parametrize("policy", [None, STRICT])
def test_unsupported_schemes_refused(url, policy):
    with pytest.raises(ValueError, match=r"^image 4: (unsupported URL scheme|local file)"):
        open_image(url, policy=policy, label="image 4")


def test_policy_validates_itself():
    with pytest.raises(ValueError, match="timeout_s"):
        MediaPolicy(timeout_s=0)
    with pytest.raises(ValueError, match="max_bytes"):
        MediaPolicy(max_bytes=0)


# ------------------------------------------------------------------------------------ local paths

def test_local_files_need_an_allowed_root(image_file):
    with pytest.raises(ValueError, match=r"^image 2: local file '/etc/passwd' refused: local media is not"):
        open_image("file:///etc/passwd", policy=STRICT, label="image 2")
    with pytest.raises(ValueError, match="local media is not allowed"):
        open_image(str(image_file), policy=STRICT)
    allowed = MediaPolicy(allowed_local_media_path=str(image_file.parent))
    assert open_image(str(image_file), policy=allowed).size == (40, 30)
    assert open_image(f"file://{image_file}", policy=allowed).size == (40, 30)
    with pytest.raises(ValueError, match="resolves outside allowed_local_media_path"):
        open_image("file:///etc/passwd", policy=allowed)


def test_escapes_via_dotdot_and_symlink_refused(image_file, tmp_path):
    root = image_file.parent
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    allowed = MediaPolicy(allowed_local_media_path=str(root))
    with pytest.raises(ValueError, match="outside allowed_local_media_path"):
        open_image(f"{root}/../secret.png", policy=allowed)
    with pytest.raises(ValueError, match="outside allowed_local_media_path"):
        open_image(f"file://{root}/../secret.png", policy=allowed)
    (root / "link.png").symlink_to(secret)
    with pytest.raises(ValueError, match="outside allowed_local_media_path"):
        open_image(str(root / "link.png"), policy=allowed)
    sibling = tmp_path / "root-evil"
    sibling.mkdir()
    (sibling / "x.png").write_bytes(PNG)
    with pytest.raises(ValueError, match="outside allowed_local_media_path"):
        open_image(str(sibling / "x.png"), policy=allowed)  # a prefix of the root is not inside it
    (root / "inner.png").symlink_to(image_file)  # a symlink that stays inside is fine
    assert open_image(str(root / "inner.png"), policy=allowed).size == (40, 30)


# ------------------------------------------------------------------------------------ SSRF

@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png", "http://127.1.2.3:8080/x.png", "http://10.0.0.1/x.png",
    "http://192.168.1.1/x.png", "http://172.16.0.1/x.png", "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/x.png", "http://[fd00:ec2::254]/latest", "http://[::ffff:127.0.0.1]/x.png",
    "http://[64:ff9b::a00:1]/x.png", "http://0.0.0.0/x.png", "http://224.0.0.1/x.png",
    "http://100.64.0.1/x.png", "http://2130706433/x.png", "https://localhost/x.png", "http://LOCALHOST./x",
])
def test_private_destinations_refused_before_connecting(url, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("must not connect")

    monkeypatch.setattr("httpx.Client.send", no_network)
    with pytest.raises(ValueError, match=r"^image 7: URL .* refused: host .* resolves to .*, (a |not )"):
        open_image(url, policy=STRICT, label="image 7")


def test_address_classification():
    for addr in ["169.254.169.254", "fd00:ec2::254"]:
        assert address_problem(ipaddress.ip_address(addr)) == "a cloud metadata address"
    assert address_problem(ipaddress.ip_address("127.0.0.1")) == "a loopback address"
    assert address_problem(ipaddress.ip_address("::ffff:10.1.2.3")) == "a private address"
    assert address_problem(ipaddress.ip_address("8.8.8.8")) is None
    assert address_problem(ipaddress.ip_address("2606:4700:4700::1111")) is None


def test_domain_allow_list(monkeypatch):
    monkeypatch.setattr("httpx.Client.send", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    policy = MediaPolicy(allowed_media_domains=["images.example.com", "*.cdn.example.org"])
    with pytest.raises(ValueError, match=r"host 'evil.com' is not in allowed_media_domains"):
        open_image("https://evil.com/a.png", policy=policy)
    with pytest.raises(ValueError, match="not in allowed_media_domains"):
        open_image("https://example.com/a.png", policy=policy)
    assert media._domain_allowed("a.cdn.example.org", policy.allowed_media_domains)
    assert media._domain_allowed("images.example.com", policy.allowed_media_domains)
    assert not media._domain_allowed("xcdn.example.org", policy.allowed_media_domains)


# ------------------------------------------------------------------------------------ http(s)

class _Handler(http.server.BaseHTTPRequestHandler):
    hosts: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        _Handler.hosts.append(self.headers.get("Host"))
        if self.path == "/img.png":
            self._send(200, PNG)
        elif self.path == "/redirect":
            self._redirect("/img.png")
        elif self.path == "/loop":
            self._redirect("/loop")
        elif self.path == "/to-metadata":
            self._redirect("http://169.254.169.254/latest/meta-data/")
        elif self.path == "/big":
            self._send(200, PNG * 10)
        elif self.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(PNG * 10)
        else:
            self._send(404, b"no")

    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    _Handler.hosts = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_http_download_with_permissive_default(server):
    expected = process_image(PNG).content_hash
    assert process_image(f"{server}/img.png").content_hash == expected
    assert process_image(f"{server}/redirect").content_hash == expected
    with pytest.raises(ValueError, match=r"^image 1: GET .*/nope' returned HTTP 404"):
        process_image(f"{server}/nope", label="image 1")
    with pytest.raises(ValueError, match=r"^image 1: GET .*more than 5 redirects"):
        process_image(f"{server}/loop", label="image 1")


def test_http_limits(server):
    lenient = dict(allow_private_addresses=True)
    with pytest.raises(ValueError, match=r"^image: GET .*/big': \d+ bytes, more than the limit 1000"):
        open_image(f"{server}/big", policy=MediaPolicy(max_bytes=1000, **lenient))
    with pytest.raises(ValueError, match=r"more than the limit of 1000 bytes"):
        open_image(f"{server}/big-chunked", policy=MediaPolicy(max_bytes=1000, **lenient))
    with pytest.raises(ValueError, match=r"more than 1 redirects"):
        open_image(f"{server}/loop", policy=MediaPolicy(max_redirects=1, **lenient))
    assert fetch_bytes(f"{server}/redirect", policy=MediaPolicy(max_redirects=1, **lenient)) == PNG
    with pytest.raises(ValueError, match=r"^image: GET .* failed: ConnectError"):
        open_image("http://127.0.0.1:9/x.png", policy=MediaPolicy(**lenient))


def test_pinned_address_and_redirect_recheck(server, monkeypatch):
    # Pretend loopback is public so the checked path runs against the local server.
    real = media.address_problem
    monkeypatch.setattr(media, "address_problem",
                        lambda ip: None if str(ip) == "127.0.0.1" else real(ip))
    port = server.rsplit(":", 1)[1]
    assert fetch_bytes(f"http://localhost:{port}/img.png", policy=STRICT) == PNG
    assert _Handler.hosts[-1] == f"localhost:{port}"  # sent to the checked address, Host kept
    with pytest.raises(ValueError, match=r"resolves to 169.254.169.254, a cloud metadata address"):
        fetch_bytes(f"{server}/to-metadata", policy=STRICT)


def test_video_source_uses_the_same_policy(tmp_path):
    from qvl.multimodal.video import process_video

    with pytest.raises(ValueError, match=r"^video 1: local file .* refused"):
        process_video(str(tmp_path / "x.mp4"), policy=STRICT, label="video 1")
    with pytest.raises(ValueError, match=r"^video 1: URL .* refused"):
        process_video("http://10.1.1.1/v.mp4", policy=STRICT, label="video 1")
    with pytest.raises(ValueError, match=r"^video 1 frame 1: URL .* refused"):
        process_video([PNG, "http://10.1.1.1/f.png"], policy=STRICT, label="video 1")
    assert os.path.exists(media.__file__)
