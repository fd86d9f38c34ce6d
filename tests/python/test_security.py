"""Transport security, bearer tokens and reflection against the real dysco-server and dysco-client.

Certificates are made at run time with openssl: a server CA and the server's certificate (SAN 127.0.0.1 and
localhost), a client CA and a client certificate for mutual TLS, and an unrelated CA with its own client
certificate (the wrong CA). Three servers on loopback:
- plain:  plaintext, --auth-token-file (two tokens), --max-request-bytes 4096, /metrics on 127.0.0.2 only;
- mtls:   TLS with --tls-client-ca (mutual TLS) and the same tokens;
- tls:    TLS alone, no tokens, --reflection false.
Every outcome is checked through dysco-client (its --tls-ca, --tls-cert/--tls-key, --token-file flags) and the
exit status / gRPC code it prints: plaintext, TLS, mutual TLS, wrong CA, missing client certificate, missing
and wrong token, token rotation by SIGHUP, oversized requests, reflection on and off, a reflection-only client
(no local .proto) calling Health and Generate, and no token or prompt text in any server log.
"""

import re
import signal
import subprocess
import time
import urllib.request

import pytest

from server_helpers import CLIENT_BIN, MODEL_DIR, SERVER_BIN, Server, missing

grpc = pytest.importorskip("grpc")

TOKEN_A = "tok-alpha-6f1c0e9b2d"
TOKEN_B = "tok-bravo-93a7d5c1e0"
TOKEN_C = "tok-charlie-0b8e4f2a77"
SECRET_PROMPT = "zebra-quartz-prompt-marker"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d, name):
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def _make_cert(d, name, ca, san=None):
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=d)
    ext = d / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE"]
    if san:
        lines.append(f"subjectAltName={san}")
    ext.write_text("\n".join(lines) + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", ext.name, "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if not SERVER_BIN.exists() or not CLIENT_BIN.exists() or not (MODEL_DIR / "model.pt").exists():
        missing("build/bin/dysco-server, dysco-client or the default model")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "server-ca")
    _make_cert(d, "server", "server-ca", san="IP:127.0.0.1,DNS:localhost")
    _make_ca(d, "client-ca")
    _make_cert(d, "client", "client-ca")
    _make_ca(d, "other-ca")
    _make_cert(d, "stranger", "other-ca")
    (d / "tokens").write_text(f"# API tokens of the test\n{TOKEN_A}\n\n  {TOKEN_B}  \n")
    for name, token in (("a", TOKEN_A), ("b", TOKEN_B), ("c", TOKEN_C), ("wrong", "tok-not-issued")):
        (d / f"token-{name}").write_text(token + "\n")
    return d


@pytest.fixture(scope="module")
def servers(pki):
    tokens = pki / "tokens-live"
    tokens.write_text((pki / "tokens").read_text())
    started = {
        "plain": Server(pki, "plain", ["--auth-token-file", tokens, "--max-request-bytes", 4096,
                                       "--metrics-host", "127.0.0.2"]),
        "mtls": Server(pki, "mtls", ["--tls-cert", pki / "server.pem", "--tls-key", pki / "server.key",
                                     "--tls-client-ca", pki / "client-ca.pem", "--auth-token-file", tokens]),
        "tls": Server(pki, "tls", ["--tls-cert", pki / "server.pem", "--tls-key", pki / "server.key",
                                   "--reflection", "false"]),
    }
    try:
        for server in started.values():
            server.wait_ready()
        started["tokens"] = tokens
        yield started
    finally:
        codes = {name: s.stop() for name, s in started.items() if isinstance(s, Server)}
        assert all(code == 0 for code in codes.values()), codes


def client(*args, timeout=120):
    run = subprocess.run([str(CLIENT_BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    return run.returncode, run.stdout, run.stderr


def tokenize(server, *flags):
    return client("tokenize", "--target", server.target, "--text", "hello there", *flags)


def assert_code(result, code):
    rc, out, err = result
    assert rc == 1 and f": {code}" in err, f"want {code}, got exit {rc}\nstdout: {out}\nstderr: {err}"


def assert_ok(result):
    rc, out, err = result
    assert rc == 0, f"exit {rc}\nstdout: {out}\nstderr: {err}"
    return out


# ---- Bearer tokens (plaintext server).

def test_missing_token_is_unauthenticated(servers):
    assert_code(tokenize(servers["plain"]), "UNAUTHENTICATED")
    rc, _, err = client("info", "--target", servers["plain"].target)
    assert rc == 1 and "UNAUTHENTICATED" in err and "authorization: Bearer" in err, err
    rc, _, err = client("generate", "--target", servers["plain"].target, "--prompt", "hi", "--max-new-tokens", 2)
    assert rc == 1 and "UNAUTHENTICATED" in err, err


def test_wrong_token_is_unauthenticated(servers, pki):
    rc, _, err = tokenize(servers["plain"], "--token-file", pki / "token-wrong")
    assert rc == 1 and "UNAUTHENTICATED" in err and "invalid bearer token" in err, err


def test_every_listed_token_is_accepted(servers, pki):
    for name in ("a", "b"):
        out = assert_ok(tokenize(servers["plain"], "--token-file", pki / f"token-{name}"))
        assert re.fullmatch(r"\d+(,\d+)*\n", out), out
    out = assert_ok(client("generate", "--target", servers["plain"].target, "--token-file", pki / "token-a",
                           "--prompt", SECRET_PROMPT, "--max-new-tokens", 4))
    assert out.endswith("\n")


def test_health_stays_open_without_a_token(servers):
    rc, out, err = client("health", "--target", servers["plain"].target, "--service", "dysco.v1.Generation")
    assert rc == 0 and "SERVING" in out, (out, err)


def test_refusals_are_counted_by_code(servers, pki):
    def unauthenticated():
        url = f"http://127.0.0.2:{servers['plain'].metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        m = re.search(r'^dysco_requests_refused_total\{code="UNAUTHENTICATED"\} (\S+)$', body, re.M)
        return float(m.group(1)) if m else 0.0
    before = unauthenticated()
    assert_code(tokenize(servers["plain"], "--token-file", pki / "token-wrong"), "UNAUTHENTICATED")
    assert unauthenticated() == before + 1


def test_sighup_reloads_the_tokens(servers, pki):
    plain = servers["plain"]
    servers["tokens"].write_text(f"{TOKEN_C}\n")
    try:
        plain.process.send_signal(signal.SIGHUP)
        give_up = time.monotonic() + 30
        while "event=auth_reload tokens=1" not in plain.log() and time.monotonic() < give_up:
            time.sleep(0.1)
        assert "event=auth_reload tokens=1" in plain.log(), plain.log()[-2000:]
        assert_code(tokenize(plain, "--token-file", pki / "token-a"), "UNAUTHENTICATED")
        assert_ok(tokenize(plain, "--token-file", pki / "token-c"))
        # A file that cannot be used keeps the tokens the server has.
        servers["tokens"].write_text("# nothing\n")
        plain.process.send_signal(signal.SIGHUP)
        give_up = time.monotonic() + 30
        while "event=auth_reload_failed" not in plain.log() and time.monotonic() < give_up:
            time.sleep(0.1)
        assert "event=auth_reload_failed" in plain.log()
        assert_ok(tokenize(plain, "--token-file", pki / "token-c"))
    finally:
        servers["tokens"].write_text((pki / "tokens").read_text())
        plain.process.send_signal(signal.SIGHUP)
        give_up = time.monotonic() + 30
        while plain.log().count("event=auth_reload tokens=2") < 1 and time.monotonic() < give_up:
            time.sleep(0.1)
    assert plain.process.poll() is None, "SIGHUP must not stop the server"


def test_oversized_request_is_refused_before_parsing(servers, pki):
    rc, _, err = client("tokenize", "--target", servers["plain"].target, "--token-file", pki / "token-a",
                        "--text", "x" * 8000)
    assert rc == 1 and "RESOURCE_EXHAUSTED" in err, err


def test_metrics_listen_on_the_metrics_host_only(servers):
    port = servers["plain"].metrics_port
    assert urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10).status == 200
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


# ---- TLS and mutual TLS.

def test_tls_server(servers, pki):
    tls = servers["tls"]
    out = assert_ok(client("generate", "--target", tls.target, "--tls-ca", pki / "server-ca.pem",
                           "--prompt", "hi", "--max-new-tokens", 3))
    assert out.endswith("\n")
    # Plaintext against TLS, and a CA that did not sign the server's certificate: no connection.
    assert_code(tokenize(tls), "UNAVAILABLE")
    assert_code(tokenize(tls, "--tls-ca", pki / "other-ca.pem"), "UNAVAILABLE")
    # The certificate names 127.0.0.1 and localhost, nothing else.
    assert_code(tokenize(tls, "--tls-ca", pki / "server-ca.pem", "--tls-server-name", "dysco.example"),
                "UNAVAILABLE")


def test_mutual_tls(servers, pki):
    mtls = servers["mtls"]
    good = ["--tls-ca", pki / "server-ca.pem", "--tls-cert", pki / "client.pem", "--tls-key", pki / "client.key"]
    assert_ok(tokenize(mtls, *good, "--token-file", pki / "token-b"))
    # Mutual TLS does not replace the token.
    assert_code(tokenize(mtls, *good), "UNAUTHENTICATED")
    # No client certificate, or one signed by another CA: the handshake fails.
    assert_code(tokenize(mtls, "--tls-ca", pki / "server-ca.pem", "--token-file", pki / "token-b"), "UNAVAILABLE")
    assert_code(tokenize(mtls, "--tls-ca", pki / "server-ca.pem", "--tls-cert", pki / "stranger.pem",
                         "--tls-key", pki / "stranger.key", "--token-file", pki / "token-b"), "UNAVAILABLE")
    assert_code(tokenize(mtls, "--token-file", pki / "token-b"), "UNAVAILABLE")


def test_client_flag_errors_name_the_flag(pki):
    rc, _, err = client("tokenize", "--text", "x", "--tls-cert", pki / "client.pem")
    assert rc == 2 and "--tls-cert and --tls-key" in err, err
    rc, _, err = client("tokenize", "--text", "x", "--token-file", pki / "no-such-file")
    assert rc == 2 and "--token-file" in err, err


def test_server_flag_errors(pki, tmp_path):
    for extra, text in ((["--tls-cert", pki / "server.pem"], "--tls-cert and --tls-key"),
                        (["--tls-client-ca", pki / "client-ca.pem"], "--tls-client-ca needs"),
                        (["--tls-cert", pki / "tokens", "--tls-key", pki / "server.key"], "not a PEM file"),
                        (["--auth-token-file", tmp_path / "none"], "--auth-token-file")):
        run = subprocess.run([str(SERVER_BIN), "--model", str(MODEL_DIR), "--host", "127.0.0.1", "--port", "0",
                              "--metrics-port", "-1", *map(str, extra)], capture_output=True, text=True, timeout=60)
        assert run.returncode in (1, 2) and text in run.stdout + run.stderr, (extra, run.stdout, run.stderr)


# ---- Reflection.

def _reflection_pool(channel):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    database = ProtoReflectionDescriptorDatabase(channel)
    return database, DescriptorPool(database)


def test_reflection_only_client_calls_health_and_generate(servers, pki):
    """No local .proto: the services, methods and messages all come from the server's reflection."""
    from google.protobuf import message_factory
    channel = grpc.insecure_channel(servers["plain"].target)
    try:
        database, pool = _reflection_pool(channel)
        services = set(database.get_services())
        assert {"dysco.v1.Generation", "grpc.health.v1.Health"} <= services, services

        health = pool.FindServiceByName("grpc.health.v1.Health").FindMethodByName("Check")
        request_type = message_factory.GetMessageClass(health.input_type)
        response_type = message_factory.GetMessageClass(health.output_type)
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=request_type.SerializeToString,
                                    response_deserializer=response_type.FromString)
        reply = check(request_type(service="dysco.v1.Generation"), timeout=10)
        assert health.output_type.fields_by_name["status"].enum_type.values_by_number[reply.status].name == "SERVING"

        generate = pool.FindServiceByName("dysco.v1.Generation").FindMethodByName("Generate")
        assert generate.server_streaming
        request_type = message_factory.GetMessageClass(generate.input_type)
        response_type = message_factory.GetMessageClass(generate.output_type)
        call = channel.unary_stream("/dysco.v1.Generation/Generate", request_serializer=request_type.SerializeToString,
                                    response_deserializer=response_type.FromString)
        request = request_type(prompt="Say hello.", max_new_tokens=4)
        replies = list(call(request, timeout=60, metadata=(("authorization", f"Bearer {TOKEN_B}"),)))
        assert sum(len(r.token_ids) for r in replies) == 4
        assert replies[-1].usage.generated_tokens == 4
    finally:
        channel.close()


def test_reflection_can_be_turned_off(servers, pki):
    credentials = grpc.ssl_channel_credentials((pki / "server-ca.pem").read_bytes())
    channel = grpc.secure_channel(servers["tls"].target, credentials)
    try:
        database, _ = _reflection_pool(channel)
        with pytest.raises(grpc.RpcError) as error:
            database.get_services()
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()


# ---- Logs.

def test_no_token_or_prompt_text_in_logs(servers):
    for name in ("plain", "mtls", "tls"):
        log = servers[name].log()
        for secret in (TOKEN_A, TOKEN_B, TOKEN_C, "tok-not-issued", SECRET_PROMPT):
            assert secret not in log, f"{secret!r} in the {name} server's log"
