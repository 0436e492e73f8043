"""`eyecare-edge serve` as integrators see it: a real uvicorn process on loopback, called with the
real `openai` client, raw HTTP and a real headless browser.

One server (2 workers, a small queue, an API key, an allowed media dir, a 1 MB body limit) on the
trained tiny bundle of `runtime_fixtures` serves every test here; expected answers come from a
`Pipeline` loaded in this process with the same options, so "the same text as Pipeline.ask" is
checked exactly. Loading-time behaviour (/health 503) runs an in-process server whose loader
waits for the test.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from runtime_fixtures import FAST, runtime_assets  # noqa: E402

from eyecare_edge.grammar import json_schema_grammar  # noqa: E402
from eyecare_edge.pipeline import Pipeline  # noqa: E402

KEY = "test-key-0123456789"
MODEL = "tiny-eyecare"
QUESTION = "Describe the image."
MAX_TOKENS = 24
SCHEMA = {
    "type": "object",
    "properties": {
        "finding": {"type": "string", "enum": ["normal", "glaucoma", "diabetic retinopathy", "cataract"]},
        "urgent": {"type": "boolean"},
    },
    "required": ["finding", "urgent"],
}
PIPE_OPTIONS = {"llm": "f32", "vision_precision": "fp32", **FAST}
SERVER_START_S = 90
BODY_TIMEOUT_S = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, key: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, dict]:
    """(status, headers with lower-case names, JSON body)."""
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


def _data_uri(path_or_bytes: Path | bytes, mime: str = "image/png") -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _image_message(url: str, question: str = QUESTION) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def _png_bomb() -> bytes:
    """A valid PNG header for 30000 x 30000 RGB in under 200 bytes."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + _png_chunk(b"IEND", b"")
    )


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.base = f"http://127.0.0.1:{port}"
        self.log = log

    def health(self) -> int:
        return _get(self.base + "/health")[0]


def _start_server(bundle: Path, log: Path, *args: str) -> Server:
    port = _free_port()
    cmd = [sys.executable, "-m", "eyecare_edge.cli", "serve", str(bundle), "--port", str(port), *args]
    fh = log.open("w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    server = Server(proc, port, log)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()}")
        try:
            if server.health() == 200:
                return server
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server not healthy after {SERVER_START_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return runtime_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def media_dir(assets, tmp_path_factory) -> Path:
    """The allowed media dir (4 phantom photos) beside a secret outside it and a symlink to it."""
    base = tmp_path_factory.mktemp("media")
    allowed = base / "allowed"
    allowed.mkdir()
    for img in assets.images[:4]:
        shutil.copy(img, allowed / img.name)
    shutil.copy(assets.images[5], base / "outside.png")
    (allowed / "escape.png").symlink_to(base / "outside.png")
    return allowed


@pytest.fixture(scope="module")
def server(assets, media_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = _start_server(
        assets.bundle,
        log,
        "--workers", "2", "--queue", "3", "--api-key", KEY, "--allowed-media-dir", str(media_dir),
        "--max-body-mb", "1", "--body-timeout", str(BODY_TIMEOUT_S), "--model-id", MODEL, "--llm", "f32", "--vision-precision", "fp32",
        "--threads", "1", "--vision-threads", "1", "--log-level", "warning",
        # room for the 1000-token answers some tests ask for (the default keeps 512 text positions)
        "--n-ctx", "2048",
    )  # fmt: skip
    yield srv
    srv.proc.terminate()
    try:
        srv.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (exit -15).
    assert srv.proc.returncode in (0, -15), log.read_text()
    text = log.read_text()
    for noise in ("Traceback", "Task was destroyed", "never retrieved"):  # asyncio leaks in the log
        assert noise not in text, text


@pytest.fixture(scope="module")
def pipe(assets):
    with Pipeline.load(assets.bundle, **PIPE_OPTIONS) as p:
        yield p


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_plain_streamed_and_json_schema_answers_equal_pipeline_ask(client, pipe, media_dir):
    image = sorted(media_dir.glob("phantom_*"))[0]
    expected = pipe.ask(image, QUESTION, max_tokens=MAX_TOKENS)
    assert expected.text

    plain = client.chat.completions.create(
        model=MODEL, messages=_image_message(_data_uri(image)), max_tokens=MAX_TOKENS, temperature=0
    )
    assert plain.choices[0].message.content == expected.text
    assert plain.choices[0].finish_reason == ("length" if expected.stop_reason == "max_tokens" else "stop")
    assert plain.usage.prompt_tokens == expected.n_prompt_tokens
    assert plain.usage.completion_tokens == expected.n_generated
    assert plain.usage.model_extra["visual_tokens"] == expected.n_image_tokens > 0

    # Streamed, the image given as a path inside the allowed dir: the same text, chunk by chunk.
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_image_message(image.name),
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == expected.text
    assert chunks[-1].usage.completion_tokens == expected.n_generated
    # The same photo again: its image prefix is reused.
    assert chunks[-1].usage.model_extra["cached_image_prefix"] is True

    # Sampled with a seed, constrained by a JSON schema: the text Pipeline.ask gives.
    want = pipe.ask(
        image,
        QUESTION,
        max_tokens=64,
        temperature=0.9,
        top_p=0.95,
        seed=11,
        grammar=json_schema_grammar(SCHEMA),
    )
    got = client.chat.completions.create(
        model=MODEL,
        messages=_image_message(_data_uri(image)),
        max_tokens=64,
        temperature=0.9,
        top_p=0.95,
        seed=11,
        response_format={"type": "json_schema", "json_schema": {"name": "finding", "schema": SCHEMA}},
    )
    text = got.choices[0].message.content
    assert text == want.text
    parsed = json.loads(text)
    assert parsed["finding"] in SCHEMA["properties"]["finding"]["enum"] and isinstance(parsed["urgent"], bool)
    assert got.choices[0].finish_reason == "stop"


def test_stop_strings_and_seed(client, pipe, media_dir):
    image = sorted(media_dir.glob("phantom_*"))[1]
    full = pipe.ask(image, QUESTION, max_tokens=MAX_TOKENS, temperature=0.8, seed=5)
    assert len(full.text) >= 6, full.text
    stop = full.text[len(full.text) // 2 :][:3]
    want = pipe.ask(image, QUESTION, max_tokens=MAX_TOKENS, temperature=0.8, seed=5, stop=[stop])
    assert stop not in want.text and len(want.text) < len(full.text) and full.text.startswith(want.text)
    got = client.chat.completions.create(
        model=MODEL,
        messages=_image_message(image.name),
        max_tokens=MAX_TOKENS,
        temperature=0.8,
        seed=5,
        stop=[stop],
    )
    assert got.choices[0].message.content == want.text


def _bad_requests(media_dir: Path, bundle_image: Path) -> list[tuple[str, bytes, dict, int, str]]:
    """(what, body, extra headers, expected status, a word the message must contain)."""
    ok_image = _data_uri(bundle_image)

    def body(**kw) -> bytes:
        return json.dumps(
            {"model": MODEL, "messages": _image_message(ok_image), "max_tokens": 4, **kw}
        ).encode()

    many = [{"type": "image_url", "image_url": {"url": ok_image}}] * 5 + [{"type": "text", "text": "q"}]
    return [
        ("invalid JSON", b'{"model": "x", "messages": [', {}, 400, "JSON"),
        ("not an object", b"[1, 2]", {}, 400, "object"),
        ("no messages", json.dumps({"model": MODEL}).encode(), {}, 400, "messages"),
        ("empty messages", body(messages=[]), {}, 400, "messages"),
        ("messages of the wrong type", body(messages="hello"), {}, 400, "messages"),
        ("max_tokens of the wrong type", body(max_tokens="ten"), {}, 400, "max_tokens"),
        ("temperature of the wrong type", body(temperature=[1]), {}, 400, "temperature"),
        ("unknown field", body(frobnicate=1), {}, 400, "frobnicate"),
        ("unknown model", body(model="gpt-4o"), {}, 404, "gpt-4o"),
        ("data URI not an image", body(messages=_image_message(_data_uri(b"hello, not an image", "image/png"))), {}, 400, "image"),
        ("30000x30000 header bomb", body(messages=_image_message(_data_uri(_png_bomb()))), {}, 400, "30000x30000"),
        ("too many images", body(messages=[{"role": "user", "content": many}]), {}, 400, "at most 4"),
        ("body over the limit", body(padding_field="x" * (1 << 20)), {}, 413, "limit"),
        ("negative max_tokens", body(max_tokens=-5), {}, 400, "max_tokens"),
        ("absolute path outside the allowed dir", body(messages=_image_message("/etc/passwd")), {}, 403, "outside"),
        ("../ escape", body(messages=_image_message("../outside.png")), {}, 403, ".."),
        ("symlink escape", body(messages=_image_message("escape.png")), {}, 403, "outside"),
        ("remote URL", body(messages=_image_message("http://example.com/a.png")), {}, 400, "remote"),
        ("wrong key", body(), {"Authorization": "Bearer wrong-key-123"}, 401, "key"),
        ("no key", body(), {"Authorization": ""}, 401, "key"),
        ("not JSON content type", body(), {"Content-Type": "text/plain"}, 415, "Content-Type"),
        ("a system turn", body(messages=[{"role": "system", "content": "x"}, *_image_message(ok_image)]), {}, 400, "one 'user'"),
        ("n > 1", body(n=2), {}, 400, "'n'"),
        ("a foreign Host header (DNS rebinding)", body(), {"Host": "evil.example:8080"}, 400, "loopback"),
        ("placeholders that do not match the images", body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ok_image}}, {"type": "text", "text": "<image> and <image>?"}]}]), {}, 400, "placeholder"),
        ("a negative seed", body(seed=-1), {}, 400, "seed"),
        ("bad response_format", body(response_format={"type": "json_schema", "json_schema": {"schema": 3}}), {}, 400, "schema"),
        # Python's json reads NaN/Infinity: temperature NaN answered "" (200), top_p NaN was a 500.
        ("temperature NaN", body(temperature=0.5).replace(b"0.5", b"NaN"), {}, 400, "NaN is not JSON"),
        ("top_p NaN", body(top_p=0.5).replace(b"0.5", b"NaN"), {}, 400, "NaN is not JSON"),
        ("temperature -Infinity", body(temperature=0.5).replace(b"0.5", b"-Infinity"), {}, 400, "Infinity"),
        ("temperature 1e999 (inf)", body(temperature=0.5).replace(b"0.5", b"1e999"), {}, 400, "temperature"),
        ("a lone surrogate in the question", json.dumps({"model": MODEL, "messages": _image_message(ok_image, "a\ud800b")}).encode(), {}, 400, "surrogate"),
        ("nested 100000 deep (was a 500)", b"[" * 100_000 + b"]" * 100_000, {}, 400, "nested"),
    ]  # fmt: skip


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server, media_dir, assets):
    for what, data, extra, status, word in _bad_requests(media_dir, assets.images[0]):
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **extra}
        headers = {k: v for k, v in headers.items() if v}
        got, _, body = _post(server.base + "/v1/chat/completions", data, headers)
        assert got == status, (what, got, body)
        assert set(body["error"]) >= {"message", "type"}, (what, body)
        assert word.lower() in body["error"]["message"].lower(), (what, body)
        assert server.health() == 200, what
    metrics = _get(server.base + "/metrics", KEY)[1].decode()
    for code in (400, 401, 403, 404, 413, 415):
        assert f'eyecare_errors_total{{code="{code}"}}' in metrics, code
    # Unknown routes and methods answer in the same shape.
    assert _get(server.base + "/v2/nothing")[0] == 404
    status, _, body = _post(server.base + "/health", b"{}", {"Content-Type": "application/json"})
    assert status == 405 and "error" in body


def test_models_metrics_and_auth(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    extra = models[0].model_extra
    assert "image" in extra["input_modalities"] and "f32" in extra["precisions"]["llm"]
    assert _get(server.base + "/v1/models")[0] == 401
    assert _get(server.base + "/metrics")[0] == 401
    status, text = _get(server.base + "/metrics", KEY)
    assert status == 200
    text = text.decode()
    for name in (
        "eyecare_requests_total",
        "eyecare_errors_total",
        "eyecare_queue_depth",
        'eyecare_tokens_total{kind="visual"}',
        "eyecare_time_to_first_token_seconds_bucket",
        "eyecare_time_per_output_token_seconds_bucket",
        "eyecare_prefix_cache_bytes",
    ):
        assert name in text, name


def test_load_every_request_answered_correctly_or_429(server, pipe, media_dir):
    """32 requests over 8 concurrent keep-alive connections against --workers 2 --queue 3."""
    import http.client

    images = sorted(media_dir.glob("phantom_*"))
    expected = {img.name: pipe.ask(img, QUESTION, max_tokens=MAX_TOKENS).text for img in images}
    n_requests, n_conn = 32, 8
    jobs = [images[i % len(images)] for i in range(n_requests)]
    results: list[tuple[int, float, str, dict]] = []
    lock = threading.Lock()

    def connection(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", int(server.base.rsplit(":", 1)[1]), timeout=120)
        for img in jobs[k::n_conn]:
            body = json.dumps(
                {"model": MODEL, "messages": _image_message(img.name), "max_tokens": MAX_TOKENS}
            ).encode()
            t = time.perf_counter()
            conn.request(
                "POST",
                "/v1/chat/completions",
                body,
                {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
            )
            r = conn.getresponse()
            data = json.loads(r.read())
            with lock:
                headers = {k.lower(): v for k, v in r.getheaders()}
                results.append((r.status, time.perf_counter() - t, img.name, {**data, "_headers": headers}))
        conn.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_conn) as ex:
        list(ex.map(connection, range(n_conn)))
    wall = time.perf_counter() - t0
    assert len(results) == n_requests
    answered = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(answered) + len(refused) == n_requests, [r[:3] for r in results if r[0] not in (200, 429)]
    assert answered
    for _, _, name, data in answered:
        assert data["choices"][0]["message"]["content"] == expected[name]
    for *_, data in refused:
        assert data["error"]["type"] == "rate_limit_exceeded"
        assert int(data["_headers"]["retry-after"]) >= 1
    assert server.health() == 200
    lat = sorted(r[1] for r in answered)
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    print(
        f"\nload: {n_requests} requests / {n_conn} connections / 2 workers: {len(answered)} answered, "
        f"{len(refused)} x 429 in {wall:.2f} s = {len(answered) / wall:.1f} answered/s; "
        f"latency p50 {1000 * statistics.median(lat):.0f} ms p95 {1000 * p95:.0f} ms"
    )


def test_page_in_headless_chromium(server, pipe, media_dir, tmp_path):
    """Upload a photo on the page at /, ask, and the streamed answer appears."""
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not os.environ.get("CI"):
        pytest.importorskip("selenium")
    if chromium is None or driver_bin is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = sorted(media_dir.glob("phantom_*"))[2]
    question = "Describe the findings in this image."
    expected = pipe.ask(image, question, max_tokens=256).text
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    try:
        driver.get(server.base + "/")
        driver.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "status").text == "image ready")
        driver.find_element(By.ID, "key").send_keys(KEY)
        q = driver.find_element(By.ID, "question")
        q.clear()
        q.send_keys(question)
        driver.find_element(By.ID, "ask").click()
        WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.ID, "status").text.startswith(("done", "the stream", "4", "5"))
        )
        status = driver.find_element(By.ID, "status").text
        assert status.startswith("done"), status
        assert driver.find_element(By.ID, "answer").get_attribute("textContent") == expected
    finally:
        driver.quit()


def test_startup_refusals(assets, tmp_path):
    """Refused before anything is loaded or bound: exit 2 for usage, 1 for a bundle problem."""
    from click.testing import CliRunner

    from eyecare_edge.cli import main

    def run(*args: str):
        return CliRunner().invoke(main, ["serve", str(assets.bundle), *args])

    r = run("--host", "0.0.0.0")
    assert r.exit_code == 2 and "without an API key" in r.output, r.output
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    r = run("--host", "0.0.0.0", "--api-key-file", str(empty))
    assert r.exit_code == 2 and "empty" in r.output, r.output
    r = run("--visual-tokens", "lots")  # the shared budget option (ask, screen) checks its value
    assert r.exit_code == 2 and "visual" in r.output.lower(), r.output
    r = run("--llm", "q2_k")
    assert r.exit_code == 1 and "no q2_k GGUF" in r.output, r.output


def test_health_is_503_while_loading(assets):
    """The port answers before the bundle is loaded: /health 503, completions 503 + Retry-After."""
    import uvicorn

    from eyecare_edge.bundle import read_manifest
    from eyecare_edge.serve.app import ServeConfig, ServerState, create_app

    release = threading.Event()

    def load() -> list[Pipeline]:
        assert release.wait(60)
        return [Pipeline.load(assets.bundle, **PIPE_OPTIONS)]

    config = ServeConfig(bundle=assets.bundle, model_id=MODEL, manifest=read_manifest(assets.bundle))
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(ServerState(config, load)), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        status, body = _get(base + "/health")
        assert status == 503 and json.loads(body)["status"] == "loading"
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
        status, headers, data = _post(
            base + "/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        assert status == 503 and "loading" in data["error"]["message"] and headers["retry-after"] == "2"
        release.set()
        for _ in range(200):
            if _get(base + "/health")[0] == 200:
                break
            time.sleep(0.05)
        assert _get(base + "/health")[0] == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_request_timeout_is_504_and_the_server_keeps_serving(assets):
    """A request whose deadline passes during its answer is stopped with 504; the pipeline goes
    back to the pool and later requests are served."""
    import uvicorn

    from eyecare_edge.bundle import read_manifest
    from eyecare_edge.serve.app import ServeConfig, ServerState, create_app

    config = ServeConfig(
        bundle=assets.bundle, model_id=MODEL, manifest=read_manifest(assets.bundle), timeout_s=0.001, queue=0
    )
    state = ServerState(config, lambda: [Pipeline.load(assets.bundle, **PIPE_OPTIONS)])
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(400):
            if server.started and _get(base + "/health")[0] == 200:
                break
            time.sleep(0.05)
        body = json.dumps(
            {"model": MODEL, "messages": _image_message(_data_uri(assets.images[0])), "max_tokens": 64}
        )
        for _ in range(3):
            status, _, data = _post(
                base + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
            )
            assert status == 504 and data["error"]["type"] == "timeout", data
        assert state.pool.pending == 0 and state.pool.running == 0
        config.timeout_s = state.pool.timeout_s = 60.0
        status, _, data = _post(
            base + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
        )
        assert status == 200 and data["choices"][0]["message"]["content"]
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_client_leaving_mid_stream_frees_its_worker(server, media_dir):
    """The generation stops at its next token once the client is gone: the worker is free again
    in well under the time the whole answer takes (a 2000-character string schema makes it run
    to max_tokens)."""
    import http.client

    schema = {"type": "string", "minLength": 2000}
    request = {
        "model": MODEL,
        "max_tokens": 1000,
        "messages": _image_message(sorted(media_dir.glob("phantom_*"))[3].name),
        "response_format": {"type": "json_schema", "json_schema": {"name": "long", "schema": schema}},
    }
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    t = time.monotonic()
    status, _, full = _post(server.base + "/v1/chat/completions", json.dumps(request).encode(), headers)
    full_s = time.monotonic() - t
    assert status == 200 and full["usage"]["completion_tokens"] == 1000

    def running() -> int:
        text = _get(server.base + "/metrics", KEY)[1].decode()
        return int(
            next(line for line in text.splitlines() if line.startswith("eyecare_requests_running ")).split()[
                1
            ]
        )

    conn = http.client.HTTPConnection("127.0.0.1", int(server.base.rsplit(":", 1)[1]), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({**request, "stream": True}), headers)
    response = conn.getresponse()
    assert response.status == 200 and response.read1(100).startswith(b"data: ")
    t = time.monotonic()
    conn.sock.close()
    conn.close()
    while running() and time.monotonic() - t < full_s:
        time.sleep(0.02)
    freed_s = time.monotonic() - t
    assert running() == 0 and freed_s < full_s / 3, (freed_s, full_s)
    assert server.health() == 200


def test_a_slow_body_gets_408_and_the_server_keeps_serving(server):
    """A client that declares a body and trickles it (one byte every 0.4 s, so no single gap is
    long) is answered 408 once --body-timeout has passed since the request began; before the
    fix the connection stayed open for as long as the client liked (seen: > 20 s)."""
    port = int(server.base.rsplit(":", 1)[1])
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n{{"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S * 4) as sock:
        sock.sendall(head.encode())
        t = time.monotonic()
        reply = b""
        sock.settimeout(0.4)
        sending = True
        while b"\r\n\r\n" not in reply and time.monotonic() - t < BODY_TIMEOUT_S * 4:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if sending:
                    try:
                        sock.sendall(b" ")
                    except OSError:
                        sending = False
                continue
            if not chunk:
                break
            reply += chunk
        waited = time.monotonic() - t
        sock.settimeout(5)
        while not reply.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert BODY_TIMEOUT_S * 0.8 < waited < BODY_TIMEOUT_S * 3, waited
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert "--body-timeout" in error["message"] and error["type"] == "timeout", error
    assert server.health() == 200
    metrics = _get(server.base + "/metrics", KEY)[1].decode()
    assert 'eyecare_requests_total{path="/v1/chat/completions",code="408"} 1' in metrics


def _exposition_families(text: str) -> dict[str, dict]:
    """Prometheus text format, checked strictly: every sample belongs to a family announced by
    HELP and TYPE, counter samples end in `_total`, histogram samples are _bucket/_sum/_count."""
    families: dict[str, dict] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            families.setdefault(name, {"samples": []})["help"] = True
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            families.setdefault(name, {"samples": []})["type"] = kind
        elif line:
            sample = line.split("{")[0].split(" ")[0]
            float(line.rsplit(" ", 1)[1])
            owner = max((f for f in families if sample.startswith(f)), key=len, default=None)
            assert owner is not None, f"sample {sample} has no TYPE before it"
            kind = families[owner].get("type")
            suffixes = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}[kind]
            assert sample[len(owner) :] in suffixes, (sample, owner, kind)
            families[owner]["samples"].append(sample)
    for name, fam in families.items():
        assert fam.get("help") and fam.get("type"), f"{name}: HELP and TYPE"
        if fam["type"] == "counter":
            assert name.endswith("_total"), f"counter {name} must end in _total"
    return families


def test_metrics_exposition_is_well_typed(server, client, media_dir):
    """Every family has HELP and TYPE; the prefix cache's hits/misses/evictions, which only
    grow, are counters (they were untyped-by-HELP gauges, so rate() did not apply)."""
    photo = sorted(media_dir.glob("phantom_*"))[0].name
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=_image_message(photo), max_tokens=2)
    families = _exposition_families(_get(server.base + "/metrics", KEY)[1].decode())
    for name in ("hits", "misses", "evictions"):
        assert families[f"eyecare_prefix_cache_{name}_total"]["type"] == "counter", name
    for name in ("entries", "bytes", "max_bytes"):
        assert families[f"eyecare_prefix_cache_{name}"]["type"] == "gauge", name
    assert families["eyecare_time_to_first_token_seconds"]["type"] == "histogram"


def test_startup_bind_errors_and_key_file_permissions(assets, tmp_path):
    """A port in use is one `error:` line and exit 1 (uvicorn alone logged it and exited 3, the
    CLI's "some items failed"); an unresolvable --host is a usage error; a key file other users
    can read is warned about."""
    from click.testing import CliRunner

    from eyecare_edge.cli import main

    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    key.chmod(0o644)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = CliRunner().invoke(
            main, ["serve", str(assets.bundle), "--port", str(port), "--api-key-file", str(key)]
        )
    assert r.exit_code == 1, r.output
    assert f"error: cannot listen on 127.0.0.1:{port}" in r.output, r.output
    assert "readable by other users (mode 0644)" in r.output and "chmod 600" in r.output, r.output
    key.chmod(0o600)
    r = CliRunner().invoke(
        main, ["serve", str(assets.bundle), "--host", "no-such-host.invalid", "--api-key-file", str(key)]
    )
    assert r.exit_code == 2 and "not an address of this machine" in r.output, r.output
    assert "readable by other users" not in r.output, r.output


def test_json_schema_enum_beyond_the_bmp_is_answered_exactly(client, media_dir):
    """Enum values (and property names) with characters beyond U+FFFF: the schema converter
    wrote them as surrogate-pair escapes that llama.cpp's grammar turned into invalid UTF-8, so
    "🙂 ok" came back as U+FFFD characters, outside the enum. Streamed and not, every sampled
    answer now parses and is one of the values."""
    values = ["🙂 ok", "正常眼底 𝔼", "rétinopathie"]
    schema = {
        "type": "object",
        "properties": {"😀 finding": {"type": "string", "enum": values}},
        "required": ["😀 finding"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "u", "schema": schema}}
    photo = sorted(media_dir.glob("phantom_*"))[1].name
    seen = set()
    for seed in range(4):
        kw = {"model": MODEL, "messages": _image_message(photo), "max_tokens": 40, "temperature": 1.0}
        text = client.chat.completions.create(**kw, seed=seed, response_format=fmt).choices[0].message.content
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**kw, seed=seed, response_format=fmt, stream=True)
            if c.choices
        )
        assert streamed == text and "\ufffd" not in text, (text, streamed)
        value = json.loads(text)["😀 finding"]
        assert value in values, text
        seen.add(value)
    assert seen & {"🙂 ok", "正常眼底 𝔼"}, seen  # an astral value was produced at least once


def _metric(base: str, name: str, default: float | None = None) -> float:
    text = _get(base + "/metrics", KEY)[1].decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values or default is not None, name
    return values[0] if values else default


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_a_request_abandoned_while_queued_never_runs(server, assets, media_dir, stream):
    """Both workers busy, a request queued behind them, then its client leaves (a camera SDK's
    timeout): it is answered 499 to nobody and never runs. it must not run vision and prefill once a worker frees up
    Before, a stream ran vision and prefill, then stopped at its first token, and a plain request
    was answered in full: on a real model, seconds of a worker for nobody. Its fresh photo
    would be a prefix-cache miss if it ran."""
    import http.client

    port = int(server.base.rsplit(":", 1)[1])
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    schema = {"type": "string", "minLength": 2000}
    busy = {
        "model": MODEL,
        "max_tokens": 400,
        "stream": True,
        "messages": _image_message(sorted(media_dir.glob("phantom_*"))[2].name),
        "response_format": {"type": "json_schema", "json_schema": {"name": "long", "schema": schema}},
    }
    conns = []
    for _ in range(2):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(busy), headers)
        conns.append((conn, conn.getresponse()))
    for _, response in conns:  # both are generating
        assert response.status == 200 and response.read1(100).startswith(b"data: ")
    deadline = time.monotonic() + 10
    while _metric(server.base, "eyecare_requests_running") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    misses = _metric(server.base, "eyecare_prefix_cache_misses_total")
    photo = _data_uri(assets.images[7 if stream else 8])
    fresh = {**busy, "max_tokens": 8, "stream": stream, "messages": _image_message(photo)}
    gone = 'eyecare_requests_total{path="/v1/chat/completions",code="499"}'
    before = _metric(server.base, gone, 0)
    queued = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    queued.request("POST", "/v1/chat/completions", json.dumps(fresh), headers)
    deadline = time.monotonic() + 10  # (no response yet: a stream answers once its job starts)
    while _metric(server.base, "eyecare_queue_depth") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    queued.sock.close()
    queued.close()
    for conn, response in conns:
        body = response.read().decode()
        assert body.rstrip().endswith("data: [DONE]"), body[-200:]
        conn.close()
    deadline = time.monotonic() + 10
    while _metric(server.base, "eyecare_queue_depth") + _metric(server.base, "eyecare_requests_running"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert _metric(server.base, "eyecare_prefix_cache_misses_total") == misses
    assert _metric(server.base, gone) == before + 1
    assert server.health() == 200


def test_an_over_limit_upload_that_expects_100_continue_is_refused_before_it_is_sent(server):
    """curl sends `Expect: 100-continue` for bodies over 1 MB and waits: the 413 must come
    first, with no "100 Continue" that would make it upload the whole body to be refused."""
    port = int(server.base.rsplit(":", 1)[1])
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {3 << 20}\r\nExpect: 100-continue\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert server.health() == 200


def test_a_stream_that_fails_before_its_first_token_is_an_http_error(client, media_dir):
    """A prompt over the context fails in prefill: streamed, that was a 200, a role chunk and an
    error event; now it is the same 400 as without streaming (clients retry or report on the
    status, e.g. openai raises BadRequestError from create())."""
    question = "word " * 3000
    photo = sorted(media_dir.glob("phantom_*"))[0].name
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=MODEL, messages=_image_message(photo, question), max_tokens=4, stream=stream
            )
        assert "context" in str(err.value), err.value
    text = "".join(  # and a normal stream still streams
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL, messages=_image_message(photo), max_tokens=8, stream=True
        )
        if c.choices
    )
    assert text
