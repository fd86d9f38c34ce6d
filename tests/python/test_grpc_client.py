"""The gRPC contract seen from an independent client: Python grpcio stubs generated from proto/ at test time.

Starts the real build/bin/dysco-server on free loopback ports, waits until grpc.health.v1 reports SERVING, and
checks streaming Generate (chat messages, token ids, DySCO selection), GetModelInfo against the model package's
config.json, Tokenize against the `tokenizers` library, INVALID_ARGUMENT errors naming the field, cancellation
mid-stream, and the Prometheus endpoint. Also drives build/bin/dysco-client when it is built.

Skipped when the server binary or the model package is missing, unless the CI environment variable is set
(then it fails). DYSCO_SERVER_BIN / DYSCO_CLIENT_BIN / DYSCO_MODEL_DIR override the default paths, and
DYSCO_SERVER_DEVICE the server's --device (scripts/gpu-default-model.sh runs this file against the server on
cuda:0: the same assertions on the GPU).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")

REPO = Path(__file__).resolve().parents[2]
SERVER_BIN = Path(os.environ.get("DYSCO_SERVER_BIN", REPO / "build" / "bin" / "dysco-server"))
CLIENT_BIN = Path(os.environ.get("DYSCO_CLIENT_BIN", REPO / "build" / "bin" / "dysco-client"))
MODEL_DIR = Path(os.environ.get("DYSCO_MODEL_DIR", REPO / "models" / "smollm2-135m-instruct"))
SERVER_DEVICE = os.environ.get("DYSCO_SERVER_DEVICE", "cpu")
# Health: "" is liveness (SERVING once the server listens), this service is readiness (SERVING once the model
# is loaded; server/dysco_server.h). Waiting on liveness alone raced the load: on cuda:0 the first RPCs got
# UNAVAILABLE "the model is loading".
READINESS_SERVICE = "dysco.v1.Generation"
FRANCE = "What is the capital of France? Answer in one sentence."
STARTUP_TIMEOUT_S = 90
RPC_TIMEOUT_S = 60


def _missing(what):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing (CI is set, so this is a failure, not a skip)")
    pytest.skip(f"{what} is missing")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    """The generated modules, from the same .proto files the C++ server compiles."""
    out = tmp_path_factory.mktemp("grpc_stubs")
    subprocess.run(["bash", str(REPO / "tools" / "gen_python_stubs.sh"), str(out)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    sys.path.insert(0, str(out))
    try:
        import generation_pb2
        import generation_pb2_grpc
        import health_pb2
        import health_pb2_grpc
    finally:
        sys.path.remove(str(out))

    class Stubs:
        gen = generation_pb2
        gen_grpc = generation_pb2_grpc
        health = health_pb2
        health_grpc = health_pb2_grpc

    return Stubs


class Server:
    def __init__(self, process, target, metrics_port, log_path, channel, pb):
        self.process = process
        self.target = target
        self.metrics_port = metrics_port
        self.log_path = log_path
        self.channel = channel
        self.stub = pb.gen_grpc.GenerationStub(channel)
        self.health = pb.health_grpc.HealthStub(channel)

    def log_tail(self, n=40):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="module")
def server(pb, tmp_path_factory):
    if not SERVER_BIN.is_file():
        _missing(f"server binary {SERVER_BIN}")
    if not (MODEL_DIR / "model.pt").is_file():
        _missing(f"model package {MODEL_DIR} (run `make model`)")
    port, metrics_port = _free_port(), _free_port()
    log_path = tmp_path_factory.mktemp("server") / "dysco-server.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [str(SERVER_BIN), "--model", str(MODEL_DIR), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", str(metrics_port), "--kv-cache-mb", "256", "--max-batch", "8",
         "--device", SERVER_DEVICE],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target)
    srv = Server(process, target, metrics_port, log_path, channel, pb)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"dysco-server exited with {process.returncode} during startup:\n{srv.log_tail()}")
            try:
                reply = srv.health.Check(pb.health.HealthCheckRequest(service=READINESS_SERVICE),
                                         timeout=1)
                if reply.status == pb.health.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dysco-server not SERVING after {STARTUP_TIMEOUT_S} s:\n{srv.log_tail()}")
            time.sleep(0.2)
        yield srv
    finally:
        channel.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def _generate(server, request):
    """Runs one streaming call; returns (responses, text, token ids)."""
    responses = list(server.stub.Generate(request, timeout=RPC_TIMEOUT_S))
    text = "".join(r.text for r in responses)
    ids = [i for r in responses for i in r.token_ids]
    return responses, text, ids


def _check_stream_shape(pb, responses, ids, request_id=None):
    assert responses, "empty stream"
    last = responses[-1]
    for r in responses[:-1]:
        assert r.finish_reason == pb.gen.FINISH_REASON_UNSPECIFIED, "finish_reason set before the last message"
        assert not r.HasField("usage"), "usage set before the last message"
    assert last.finish_reason != pb.gen.FINISH_REASON_UNSPECIFIED
    assert last.HasField("usage")
    assert last.usage.prompt_tokens > 0
    assert last.usage.generated_tokens == len(ids)
    assert last.usage.total_seconds >= last.usage.time_to_first_token_seconds >= 0
    if request_id is not None:
        assert all(r.request_id == request_id for r in responses)


def _france_messages(pb):
    return pb.gen.ChatMessages(messages=[pb.gen.ChatMessage(role="user", content=FRANCE)])


def test_health_serving(pb, server):
    for service in ("", READINESS_SERVICE):
        reply = server.health.Check(pb.health.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == pb.health.HealthCheckResponse.SERVING, service


def test_generate_chat_france_streams_paris(pb, server):
    request = pb.gen.GenerateRequest(messages=_france_messages(pb), max_new_tokens=32,
                                     request_id="py-france")
    responses, text, ids = _generate(server, request)
    _check_stream_shape(pb, responses, ids, request_id="py-france")
    assert "Paris" in text, text
    assert sum(1 for r in responses if r.token_ids) >= 2, "the answer was not streamed in several messages"


def test_token_id_input_matches_chat_messages(pb, server):
    # The chat prompt as token ids (Tokenize), then generated from the ids: same greedy continuation.
    tokenized = server.stub.Tokenize(pb.gen.TokenizeRequest(messages=_france_messages(pb), chat=True),
                                     timeout=RPC_TIMEOUT_S)
    assert len(tokenized.token_ids) > 10
    from_ids = pb.gen.GenerateRequest(token_ids=pb.gen.TokenIds(ids=tokenized.token_ids), max_new_tokens=16)
    responses, text, ids = _generate(server, from_ids)
    _check_stream_shape(pb, responses, ids)
    assert responses[-1].usage.prompt_tokens == len(tokenized.token_ids)
    from_messages = pb.gen.GenerateRequest(messages=_france_messages(pb), max_new_tokens=16)
    _, text_m, ids_m = _generate(server, from_messages)
    assert ids == ids_m
    assert "Paris" in text, text


def test_model_info_matches_package_config(pb, server):
    config = json.loads((MODEL_DIR / "config.json").read_text())
    info = server.stub.GetModelInfo(pb.gen.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S)
    assert info.model_name == config["model_name"]
    assert info.architecture == config["architecture"]
    assert info.vocab_size == config["vocab_size"]
    assert info.num_layers == config["num_layers"]
    assert info.num_attention_heads == config["num_attention_heads"]
    assert info.num_kv_heads == config["num_kv_heads"]
    assert info.chat_format == config["chat_format"]
    assert info.dtype == config["dtype"]
    assert list(info.eos_token_ids) == config["special_tokens"]["eos_token_ids"]
    assert 0 < info.context_length <= config["max_position_embeddings"]
    heads = [[h.layer, h.head] for h in info.dysco_defaults.selected_heads]
    assert heads == config["dysco"]["selected_heads"]
    assert info.dysco_defaults.top_p == pytest.approx(config["dysco"]["top_p"])
    assert info.dysco_defaults.top_k == config["dysco"]["top_k"]
    assert info.limits.max_batch_size == 8  # --max-batch 8 above
    assert info.limits.max_context_tokens > 0 and info.limits.max_new_tokens > 0
    assert info.limits.kv_cache_pages > 0 and info.limits.kv_page_size > 0
    assert info.device == SERVER_DEVICE  # the device the server was started on


def test_tokenize_matches_hf_tokenizers(pb, server):
    tokenizers = pytest.importorskip("tokenizers")
    text = "The capital of France is Paris. Ünïcode, numbers 12345 and   spaces!"
    reply = server.stub.Tokenize(pb.gen.TokenizeRequest(text=text), timeout=RPC_TIMEOUT_S)
    expected = tokenizers.Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json")).encode(
        text, add_special_tokens=False)
    assert list(reply.token_ids) == expected.ids
    assert len(reply.tokens) == len(reply.token_ids)


@pytest.mark.parametrize("field, kwargs", [
    ("sampling.top_p", dict(prompt="hi", sampling={"top_p": 1.5})),
    ("sampling.temperature", dict(prompt="hi", sampling={"temperature": -1.0})),
    ("dysco.decay_factor", dict(prompt="hi", dysco={"enabled": True, "decay_factor": 1.5})),
    ("input", dict()),
    ("token_ids", dict(token_ids={"ids": [1, 10_000_000]})),
])
def test_invalid_argument_names_the_field(pb, server, field, kwargs):
    request = pb.gen.GenerateRequest(max_new_tokens=4, **kwargs)
    with pytest.raises(grpc.RpcError) as error:
        list(server.stub.Generate(request, timeout=RPC_TIMEOUT_S))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details(), error.value.details()


def test_cancel_mid_stream_then_server_still_serves(pb, server):
    request = pb.gen.GenerateRequest(prompt="Write a very long story about a dragon and a knight.", chat=True,
                                     max_new_tokens=400)
    call = server.stub.Generate(request, timeout=RPC_TIMEOUT_S)
    received = 0
    for response in call:
        received += len(response.token_ids)
        if received >= 3:
            break
    assert received >= 3
    call.cancel()
    with pytest.raises(grpc.RpcError) as error:
        for response in call:
            assert response.finish_reason == pb.gen.FINISH_REASON_UNSPECIFIED
    assert error.value.code() == grpc.StatusCode.CANCELLED
    # The cancelled sequence must not hold the server: a new call completes.
    responses, text, ids = _generate(server, pb.gen.GenerateRequest(messages=_france_messages(pb),
                                                                    max_new_tokens=12))
    _check_stream_shape(pb, responses, ids)


def test_dysco_stream_returns_selection(pb, server):
    request = pb.gen.GenerateRequest(messages=_france_messages(pb), max_new_tokens=12, return_selection=True,
                                     dysco=pb.gen.DyscoParams(enabled=True))
    responses, text, ids = _generate(server, request)
    _check_stream_shape(pb, responses, ids)
    steps = [s for r in responses for s in r.selection]
    assert steps, "return_selection gave no selection"
    for step in steps:
        assert step.phase in ("context_warmup", "intervention_warmup", "generate")
        for rng in step.ranges:
            assert 0 <= rng.start < rng.end <= step.position + 1


def test_metrics_endpoint_counts_requests(pb, server):
    _generate(server, pb.gen.GenerateRequest(prompt="Hello", max_new_tokens=2))
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = reply.read().decode()
    assert "dysco_requests_total" in body


def _client(*args):
    if not CLIENT_BIN.is_file():
        _missing(f"client binary {CLIENT_BIN}")
    return subprocess.run([str(CLIENT_BIN), *args], capture_output=True, text=True, timeout=RPC_TIMEOUT_S)


def test_dysco_client_cli(server):
    health = _client("health", "--target", server.target)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING", health
    gen = _client("generate", "--target", server.target, "--chat", "--prompt", FRANCE, "--max-new-tokens", "24")
    assert gen.returncode == 0, gen.stderr
    assert "Paris" in gen.stdout
    assert "generated_tokens=" in gen.stderr and "ttft_ms=" in gen.stderr
    bad = _client("generate", "--target", server.target, "--prompt", "hi", "--top-p", "1.5")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr and "sampling.top_p" in bad.stderr
    info = _client("info", "--target", server.target, "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["num_layers"] > 0
