"""Fault injection against the real build/bin/dysco-server binary.

- A missing or corrupt model package at start (no directory, an empty one, model.pt truncated or empty,
  weights.safetensors truncated or missing, config.json garbage / truncated / without its fields / of format 1
  / contradicting the weights, tokenizer.json garbage or
  missing): the server exits 1 (not a signal: no crash, no core dump) within a bounded time (no hang), and
  its output has exactly one error line, `event=load_failed`, naming the file at fault; every line it wrote
  is its own logfmt line.
- A client that vanishes mid-stream: a dysco-client reading slowly (small HTTP/2 window, a pause after every
  message) or at full speed is SIGKILLed after its first token, next to a stream that runs to its end: the
  session is freed (dysco_requests_running, dysco_requests_waiting and dysco_kv_cache_usage_ratio back to 0),
  counted once as cancelled, the other stream gets exactly what it gets alone, and the server stays SERVING.
(KV pages exhausted: tests/cpp/test_server.cpp, ServerLifecycleTest.RequestThatCanNeverFitThePool...)

Skipped when the binaries or the model package are missing, unless the CI environment variable is set (then
it fails). DYSCO_SERVER_BIN / DYSCO_CLIENT_BIN / DYSCO_MODEL_DIR override the default paths.
"""

import json
import subprocess
import threading
import time

import pytest

from server_helpers import CLIENT_BIN, MODEL_DIR, SERVER_BIN, load_soak, need

grpc = pytest.importorskip("grpc")

START_LIMIT_S = 60  # a failing start takes about a second; more is a hang


soak = load_soak()




# ---- A missing or corrupt package at start.

def _package(tmp_path, model="link", config="copy", tokenizer="copy", weights="link"):
    """A package directory: each file linked / copied from the default package, or replaced."""
    d = tmp_path / "package"
    d.mkdir()
    for name, how in (("model.pt", model), ("config.json", config), ("tokenizer.json", tokenizer),
                      ("weights.safetensors", weights)):
        src = MODEL_DIR / name
        if how == "link":
            (d / name).symlink_to(src)
        elif how == "copy":
            (d / name).write_bytes(src.read_bytes())
        elif callable(how):
            (d / name).write_bytes(how(src))
        # None: absent
    return d


def _truncated(fraction_or_bytes):
    def make(src):
        size = src.stat().st_size
        n = fraction_or_bytes if isinstance(fraction_or_bytes, int) else int(size * fraction_or_bytes)
        with open(src, "rb") as f:
            return f.read(n)
    return make


def _config_with(**fields):
    def make(src):
        config = json.loads(src.read_text())
        config.update(fields)
        return json.dumps(config).encode()
    return make


STARTUP_FAULTS = {
    # name: (how the package is made, substrings the one error line must contain)
    "missing directory": (lambda tmp: tmp / "no-such-package", ["no-such-package/config.json", "cannot open"]),
    "empty directory": (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", ["config.json", "cannot open"]),
    "model.pt truncated": (lambda tmp: _package(tmp, model=_truncated(0.5)),
                           ["model.pt", "TorchScript load failed"]),
    "model.pt empty": (lambda tmp: _package(tmp, model=lambda src: b""), ["model.pt", "TorchScript load failed"]),
    "model.pt missing": (lambda tmp: _package(tmp, model=None), ["model.pt", "cannot open"]),
    "config.json garbage": (lambda tmp: _package(tmp, config=lambda src: b"\x00\xffgarbage{{[\n"),
                            ["config.json", "not valid JSON"]),
    "config.json truncated": (lambda tmp: _package(tmp, config=_truncated(0.5)), ["config.json", "not valid JSON"]),
    "config.json without fields": (lambda tmp: _package(tmp, config=lambda src: b"{}"),
                                   ["config.json", "format_version"]),
    "config.json format_version 1": (lambda tmp: _package(tmp, config=_config_with(format_version=1)),
                                     ["config.json", "format_version 1", "re-export"]),
    # Valid JSON that contradicts the weights: caught when they are bound at load, naming the tensor.
    "config.json num_kv_heads contradicts the weights": (
        lambda tmp: _package(tmp, config=_config_with(num_kv_heads=1)),
        ["weights.safetensors", "model.layers.0.self_attn.k_proj.weight", "config.json implies [64, 576]"]),
    "config.json dtype contradicts the weights": (
        lambda tmp: _package(tmp, config=_config_with(dtype="bfloat16")),
        ["weights.safetensors", "has dtype F32, config.json dtype bfloat16 needs BF16"]),
    "config.json vocab_size contradicts the weights": (
        lambda tmp: _package(tmp, config=_config_with(vocab_size=50000)),
        ["weights.safetensors", "model.embed_tokens.weight", "config.json implies [50000, 576]"]),
    "weights.safetensors truncated": (lambda tmp: _package(tmp, weights=_truncated(0.5)),
                                      ["weights.safetensors", "truncated file"]),
    "weights.safetensors missing": (lambda tmp: _package(tmp, weights=None),
                                    ["weights.safetensors", "cannot open"]),
    "tokenizer.json garbage": (lambda tmp: _package(tmp, tokenizer=lambda src: b"zzz"), ["tokenizer.json"]),
    "tokenizer.json missing": (lambda tmp: _package(tmp, tokenizer=None), ["tokenizer.json"]),
}


@pytest.mark.parametrize("fault", list(STARTUP_FAULTS))
def test_bad_package_exits_with_one_error_line(tmp_path, fault):
    need(SERVER_BIN, MODEL_DIR / "model.pt")
    make, expected = STARTUP_FAULTS[fault]
    package = make(tmp_path)
    start = time.monotonic()
    try:
        run = subprocess.run([str(SERVER_BIN), "--model", str(package), "--host", "127.0.0.1", "--port", "0",
                              "--metrics-port", "0"], capture_output=True, text=True, timeout=START_LIMIT_S,
                             cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{fault}: dysco-server still running after {START_LIMIT_S} s (a hang)")
    lines = (run.stdout + run.stderr).splitlines()
    assert run.returncode == 1, f"{fault}: exit {run.returncode} (negative = killed by a signal)\n" + "\n".join(lines)
    errors = [line for line in lines if "level=error" in line or "level=critical" in line]
    assert len(errors) == 1, f"{fault}: want one error line, got:\n" + "\n".join(lines)
    assert "event=load_failed" in errors[0], errors[0]
    for text in expected:
        assert text in errors[0], f"{fault}: {text!r} not in {errors[0]!r}"
    # Nothing but the server's own structured lines: no torch warnings, traces or "core dumped".
    for line in lines:
        assert line.startswith("ts="), f"{fault}: an unstructured line: {line!r}"
    assert time.monotonic() - start < START_LIMIT_S


# ---- A client that vanishes mid-stream.

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need(SERVER_BIN, CLIENT_BIN, MODEL_DIR / "model.pt")
    work = tmp_path_factory.mktemp("faults")
    pb = soak.load_stubs(work / "stubs")
    srv = soak.ServerProcess(SERVER_BIN, MODEL_DIR, work / "dysco-server.log",
                             ["--kv-pages", 256, "--max-batch", 4, "--max-context", 1024, "--threads", 2])
    try:
        srv.wait_ready(pb, grpc)
        srv.pb = pb
        srv.channel = grpc.insecure_channel(srv.target)
        srv.stub = pb.gen_grpc.GenerationStub(srv.channel)
        yield srv
    finally:
        if hasattr(srv, "channel"):
            srv.channel.close()
        code = srv.stop()
        assert code == 0, f"dysco-server exit {code} after SIGTERM:\n{srv.log_tail()}"


def _counter(server, reason):
    return soak.series_sum(server.scrape(), "dysco_requests_total", finish_reason=reason)


def _generate(server, **fields):
    request = server.pb.gen.GenerateRequest(**fields)
    responses = list(server.stub.Generate(request, timeout=120))
    return [i for r in responses for i in r.token_ids], responses[-1]


@pytest.mark.parametrize("read_delay_ms", [1000, 0], ids=["slow reader", "fast reader"])
def test_vanishing_client_frees_its_session(server, read_delay_ms):
    pb = server.pb
    pool = list(server.stub.Tokenize(pb.gen.TokenizeRequest(text=soak.FILLER), timeout=60).token_ids)
    neighbour = dict(prompt="Write a short poem about the sea.", chat=True, max_new_tokens=24)
    alone, _ = _generate(server, **neighbour)
    ok, _ = soak.wait_idle(server, 30)
    assert ok
    cancelled_before = _counter(server, "cancelled")

    # A neighbour stream runs through the whole fault.
    result = {}
    thread = threading.Thread(target=lambda: result.update(ids=_generate(server, **neighbour)[0]))
    thread.start()
    victim = soak.ClientProcess(CLIENT_BIN, server.target,
                                ["--token-ids", ",".join(map(str, pool[:64])), "--max-new-tokens", 384],
                                f"vanish-{read_delay_ms}", read_delay_ms=read_delay_ms, timeout_s=120)
    try:
        first = None
        give_up = time.monotonic() + 60
        while first is None and time.monotonic() < give_up:
            message = victim.next_message(give_up - time.monotonic())
            if message is None:
                break
            if message.get("token_ids"):
                first = message
        assert first is not None, "the victim got no token within 60 s"
        time.sleep(2.0)  # a slow reader's unread messages pile up: the server's writes wait
        scrape = server.scrape()
        assert soak.series_sum(scrape, "dysco_requests_running") >= 1
        assert soak.series_sum(scrape, "dysco_kv_cache_usage_ratio") > 0
        assert victim.process.poll() is None, "the victim ended before it could vanish"
    finally:
        victim.kill()  # SIGKILL: no RST_STREAM, the TCP connection just closes

    thread.join(120)
    assert not thread.is_alive()
    assert result.get("ids") == alone, "the neighbour stream was disturbed"
    ok, scrape = soak.wait_idle(server, 30)
    assert ok, f"session not freed: {[(n, v) for n, l, v in scrape if n.startswith('dysco_requests_') or 'kv' in n]}"
    give_up = time.monotonic() + 10
    while _counter(server, "cancelled") == cancelled_before and time.monotonic() < give_up:
        time.sleep(0.1)
    assert _counter(server, "cancelled") == cancelled_before + 1
    assert soak.health_status(pb, grpc, server.target, "dysco.v1.Generation") == "SERVING"
    assert server.alive()
    ids, last = _generate(server, prompt="Hello", max_new_tokens=4)
    assert last.finish_reason in (pb.gen.STOP, pb.gen.LENGTH) and len(ids) == last.usage.generated_tokens
