"""The web page at `/`, in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium)
against a real `qvl serve` subprocess on the demo checkpoint, with an API key.

Covers: the page and its assets load without a key while the API stays protected, the CSP header, a
wrong key -> readable message and the right one kept in sessionStorage only, examples/shapes.png
attached through the file input with its resized size and token count (== /tokenize), "Where is the
red circle?" -> a box drawn over the image at the pixels the API gives, then (with that history) "What
color is the circle?" -> `red` (the demo was trained on one question per image: asked second, its box
drifts), drop / paste / video attachments, a 4xx body shown as a message, a long reply stopped
mid-stream -> the request aborted in /metrics, an XSS reply (and box label) rendered as text, a dropped
stream -> message, and `--no-ui`. A screenshot of the finished chat is saved under the test's tmp dir (and, with
QVL_UPDATE_SCREENSHOT=1 or when missing, to docs/web.png). Skips, saying why, when Chromium or
chromedriver cannot be started.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from qvl.config import DEMO_MODEL
from test_server import ServerProcess, metric, metrics_values

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "examples" / "shapes.png"
KEY = "web-test-key"
MODEL = "qvl-demo"
MAX_MODEL_LEN = 2048


def _chrome():
    """A headless Chromium driven by chromedriver, or pytest.skip with the reason."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        reason = "no chromium / chromedriver on PATH (apt-get install chromium chromium-driver)"
        print("SKIP test_web:", reason)
        pytest.skip(reason)
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,1300"):
        opts.add_argument(flag)
    try:
        return webdriver.Chrome(service=Service(driver_path), options=opts)
    except Exception as exc:  # noqa: BLE001 - any start failure is a skip with its reason
        reason = f"chromium did not start: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print("SKIP test_web:", reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    drv = _chrome()
    drv.set_script_timeout(30)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("web") / "server.log"
    srv = ServerProcess(DEMO_MODEL, ["--api-key", KEY, "--served-model-name", MODEL,
                                     "--max-model-len", str(MAX_MODEL_LEN)], log)
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture
def page(browser, server):
    """The browser on the page with the key in sessionStorage (loads it when an earlier test did not)."""
    if not browser.current_url.startswith(server.url) or text_of(browser, "#model-id") != MODEL:
        browser.get(server.url + "/")
        browser.execute_script("sessionStorage.setItem('qvl.apiKey', arguments[0])", KEY)
        browser.get(server.url + "/")
        wait_for(lambda: text_of(browser, "#model-id") == MODEL, what="the model id")
    return browser


def wait_for(fn, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def by_id(drv, id_: str):
    return drv.find_element("id", id_)


def text_of(drv, selector: str) -> str:
    return drv.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : ''",
                              selector)


def ask(drv, question: str, timeout: float = 60):
    """Type and send a question; wait for the reply to finish; the reply element."""
    before = len(drv.find_elements("css selector", ".msg.assistant"))
    box = by_id(drv, "prompt")
    box.clear()
    box.send_keys(question)
    by_id(drv, "send").click()
    wait_for(lambda: len(drv.find_elements("css selector", ".msg.assistant.done")) > before, timeout,
             f"the reply to {question!r}")
    return drv.find_elements("css selector", ".msg.assistant")[-1]


def error_text(drv) -> str:
    return drv.execute_script("return document.getElementById('error').hidden ? ''"
                              " : document.getElementById('error-text').textContent")


# ------------------------------------------------------------------------------------------ tests

def test_page_public_api_protected_csp(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp
    assert '<script src="/static/app.js"' in r.text and "<script>" not in r.text     # no inline script
    js = httpx.get(server.url + "/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "innerHTML" not in js.text and "insertAdjacentHTML" not in js.text
    assert httpx.get(server.url + "/static/style.css").status_code == 200
    assert httpx.get(server.url + "/static/nope.js").status_code == 404
    assert httpx.get(server.url + "/static/..%2Fapp.py").status_code == 404
    assert httpx.head(server.url + "/").status_code in (200, 405)                  # not 401
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/tokenize"),
                         ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/"),
                         ("POST", "/static/app.js"), ("GET", "/docs"), ("GET", "/openapi.json")):
        assert httpx.request(method, server.url + path).status_code == 401, (method, path)


def test_wrong_key_message_then_key_kept_in_session(browser, server, http):
    browser.get(server.url + "/")
    wait_for(lambda: by_id(browser, "key-form").is_displayed(), what="the key form")
    assert "Missing API key" in error_text(browser)
    by_id(browser, "api-key").send_keys("wrong-key")
    by_id(browser, "key-save").click()
    wait_for(lambda: "Invalid API key" in error_text(browser), what="the wrong-key message")
    assert "401" in error_text(browser)
    by_id(browser, "api-key").send_keys(KEY)
    by_id(browser, "key-save").click()
    wait_for(lambda: text_of(browser, "#model-id") == MODEL, what="the model id")
    assert text_of(browser, "#max-model-len") == str(http.get("/v1/models").json()["data"][0]["max_model_len"])
    assert not by_id(browser, "key-form").is_displayed() and error_text(browser) == ""
    assert browser.execute_script("return sessionStorage.getItem('qvl.apiKey')") == KEY
    assert browser.execute_script("return localStorage.length") == 0
    assert KEY not in browser.execute_script("return document.cookie")


def test_attach_shows_resized_size_and_tokens(page, http):
    browser = page
    by_id(browser, "file").send_keys(str(SHAPES))
    thumb = wait_for(lambda: browser.find_elements("css selector", "#attachments .thumb[data-tokens]"),
                     what="the token count")[0]
    url = "data:image/png;base64," + base64.b64encode(SHAPES.read_bytes()).decode()
    ref = http.post("/tokenize", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]}).json()
    (item,) = ref["items"]
    assert thumb.get_attribute("data-tokens") == str(item["tokens"])
    assert f"{item['tokens']} tokens" in thumb.text
    (ow, oh), (rw, rh) = item["original_size"], item["resized_size"]
    assert f"{ow}×{oh} → {rw}×{rh}" in thumb.text
    total = wait_for(lambda: text_of(browser, "#token-total"), what="the running total")
    assert f"/ {MAX_MODEL_LEN} tokens" in total
    assert int(by_id(browser, "token-total").get_attribute("data-count")) >= item["tokens"]


def test_grounding_box_drawn_over_image(page, http):
    browser = page
    if not browser.find_elements("css selector", "#attachments .thumb, .msg"):    # run alone
        by_id(browser, "file").send_keys(str(SHAPES))
    reply = ask(browser, "Where is the red circle?")
    boxes = wait_for(lambda: reply.find_elements("css selector", ".grounding .box"), what="a box")
    img = reply.find_element("css selector", ".grounding img")
    # the same conversation through the API, not streamed: the page drew the pixels the server gives
    history = browser.execute_script("return state.history")
    body = http.post("/v1/chat/completions", json={"model": MODEL, "messages": history[:-1],
                                                   "temperature": 0, "max_tokens": 256}).json()
    ref = body["qvl_boxes"][0][0]
    streamed = []                      # the page reads them from the streamed finish chunk: same boxes
    with http.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": history[:-1],
                                                          "temperature": 0, "max_tokens": 256,
                                                          "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                streamed += [c["qvl_boxes"] for c in json.loads(line[6:])["choices"] if "qvl_boxes" in c]
    assert streamed == [body["qvl_boxes"][0]]
    assert boxes[0].get_attribute("data-pixels") == ",".join(str(v) for v in ref["pixels"])
    assert boxes[0].find_element("css selector", ".box-label").text == (ref["label"] or "box")
    ir, br = img.rect, boxes[0].rect
    nat_w = browser.execute_script("return arguments[0].naturalWidth", img)
    scale = ir["width"] / nat_w
    x1, y1 = ref["pixels"][:2]
    assert abs(br["x"] - (ir["x"] + x1 * scale)) <= 3 and abs(br["y"] - (ir["y"] + y1 * scale)) <= 3
    assert "<|box_start|>" not in reply.text


def test_color_question_streams_red_and_screenshot(page, tmp_path):
    browser = page
    reply = ask(browser, "What color is the circle?")
    assert "red" in reply.find_element("css selector", ".text").text.lower()
    assert "finish: stop" in reply.text
    first, second = browser.find_elements("css selector", ".msg.user")
    assert first.find_elements("css selector", ".media img") and not second.find_elements("css selector", "img")
    assert [m["role"] for m in browser.execute_script("return state.history")] == ["user", "assistant"] * 2
    shot = tmp_path / "web.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    docs = ROOT / "docs" / "web.png"
    if os.environ.get("QVL_UPDATE_SCREENSHOT") == "1" or not docs.exists():
        docs.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, docs)


def test_4xx_body_shown(page):
    browser = page
    by_id(browser, "max-tokens").clear()
    by_id(browser, "max-tokens").send_keys("100000")
    try:
        reply = ask(browser, "What shape is red?")
        msg = error_text(browser)
        assert msg.startswith("Error 400:") and "100000" in msg, msg
        assert "failed" in reply.text
    finally:
        by_id(browser, "max-tokens").clear()
        by_id(browser, "max-tokens").send_keys("256")


def test_stop_aborts_request(page, server, http):
    browser = page
    by_id(browser, "clear").click()
    before = metrics_values(http.get("/metrics").text)
    by_id(browser, "ignore-eos").click()
    by_id(browser, "max-tokens").clear()
    by_id(browser, "max-tokens").send_keys("1500")
    by_id(browser, "prompt").send_keys("Tell me a long story.")
    by_id(browser, "send").click()
    wait_for(lambda: len(text_of(browser, ".msg.assistant.streaming .text")) > 20, what="the reply streaming")
    by_id(browser, "stop").click()
    reply = wait_for(lambda: browser.find_elements("css selector", ".msg.assistant.stopped"), what="stopped")[0]
    assert "stopped" in reply.text and error_text(browser) == ""
    assert not by_id(browser, "send").get_attribute("disabled")

    def aborted():     # the fetch abort closes the connection: the server aborts it as a client disconnect
        v = metrics_values(http.get("/metrics").text)
        return metric(v, "qvl:request_failure_total", status="499") == \
            metric(before, "qvl:request_failure_total", status="499") + 1
    wait_for(aborted, what="the abort in /metrics")
    v = metrics_values(http.get("/metrics").text)
    assert metric(v, "qvl:num_requests_running") == 0
    assert "status=499" in server.log()
    by_id(browser, "ignore-eos").click()


FAKE_FETCH = """
const chunks = arguments[0], fail = arguments[1];
window.__realFetch = window.__realFetch || window.fetch;
window.fetch = (url, init) => {
  if (!String(url).endsWith('/v1/chat/completions')) return window.__realFetch(url, init);
  const enc = new TextEncoder();
  const body = new ReadableStream({start(c) {
    for (const ch of chunks) c.enqueue(enc.encode('data: ' + ch + '\\n\\n'));
    if (fail) setTimeout(() => c.error(new TypeError('network error')), 300); else c.close();
  }});
  return Promise.resolve(new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}}));
};
"""


def _chunk(delta: dict | None = None, finish: str | None = None, boxes=None) -> str:
    c = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    if boxes is not None:
        c["qvl_boxes"] = boxes
    return json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": [c]})


def test_xss_reply_rendered_as_text_and_dropped_stream(page):
    browser = page
    by_id(browser, "clear").click()
    by_id(browser, "file").send_keys(str(SHAPES))
    payload = '<img src=x onerror="window.__xss=1"><b>bold</b>'
    label = '<img src=y onerror="window.__xss=2">'
    chunks = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": payload[:9]}),
              _chunk({"content": payload[9:]}),
              _chunk(finish="stop", boxes=[{"label": label, "kind": "box", "pixels": [10, 10, 100, 100]}]),
              "[DONE]"]
    browser.execute_script(FAKE_FETCH, chunks, False)
    try:
        reply = ask(browser, "Say something nasty.")
        assert reply.find_element("css selector", ".text").text == payload
        assert reply.find_element("css selector", ".box-label").text == label
        assert not browser.find_elements("css selector", "#chat img[src='x'], #chat img[src='y'], #chat b")
        assert browser.execute_script("return window.__xss") is None
        inline = ("const s = document.createElement('script'); s.textContent = 'window.__inline = 1';"
                  "document.body.appendChild(s); return window.__inline === undefined")
        assert browser.execute_script(inline)                              # the CSP blocks inline scripts
        browser.execute_script(FAKE_FETCH, [_chunk({"content": "half a rep"})], True)
        reply = ask(browser, "Again.")
        assert "half a rep" in reply.text and "failed" in reply.text
        assert "connection dropped mid-reply" in error_text(browser)
    finally:
        browser.execute_script("if (window.__realFetch) window.fetch = window.__realFetch")


DROP_AND_PASTE = """
const canvas = document.createElement('canvas');
canvas.width = 300; canvas.height = 200;
const ctx = canvas.getContext('2d');
ctx.fillStyle = '#c33'; ctx.fillRect(20, 20, 120, 90);
const blob = await new Promise((r) => canvas.toBlob(r, 'image/png'));
const send = (type, name) => {
  const dt = new DataTransfer();
  dt.items.add(new File([blob], name, {type: 'image/png'}));
  const ev = type === 'drop' ? new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})
                             : new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true});
  document.getElementById(type === 'drop' ? 'chat' : 'prompt').dispatchEvent(ev);
};
send('drop', 'dropped.png');
send('paste', 'pasted.png');
"""


def test_drop_paste_and_video_attachments(page):
    browser = page
    by_id(browser, "clear").click()
    browser.execute_script(f"(async () => {{ {DROP_AND_PASTE} }})()")
    by_id(browser, "file").send_keys(str(ROOT / "examples" / "moving.mp4"))
    thumbs = wait_for(lambda: (t := browser.find_elements("css selector", "#attachments .thumb[data-tokens]"))
                      and len(t) == 3 and t, what="three counted attachments")
    kinds = sorted(t.get_attribute("data-kind") for t in thumbs)
    assert kinds == ["image", "image", "video"]
    assert {"dropped.png", "pasted.png", "moving.mp4"} <= {t.find_element("css selector", ".name").text
                                                          for t in thumbs}
    total = int(by_id(browser, "token-total").get_attribute("data-count"))
    assert total > sum(int(t.get_attribute("data-tokens")) for t in thumbs)
    for t in thumbs:
        t.find_element("css selector", ".remove").click()
    assert not browser.find_elements("css selector", "#attachments .thumb")


def test_no_ui_flag(tmp_path):
    from qvl.config import ServeOptions, dataclass_from_args
    from qvl.server.launch import add_serve_args
    import argparse

    parser = add_serve_args(argparse.ArgumentParser())
    assert dataclass_from_args(ServeOptions, parser.parse_args([])).ui is True
    assert dataclass_from_args(ServeOptions, parser.parse_args(["--no-ui"])).ui is False
    srv = ServerProcess(DEMO_MODEL, ["--no-ui", "--max-model-len", "512"], tmp_path / "server.log")
    try:
        assert httpx.get(srv.url + "/").status_code == 404
        assert httpx.get(srv.url + "/static/app.js").status_code == 404
        assert httpx.get(srv.url + "/v1/models").status_code == 200
    finally:
        assert srv.stop() == 0
