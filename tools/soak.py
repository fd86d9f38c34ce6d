#!/usr/bin/env python3
"""Bounded soak test of dysco-server (`make soak`; the 60 s CI form is tests/python/test_soak.py).

Starts the real build/bin/dysco-server on free loopback ports with the default model package, then:
  1. warm-up: one request of every shape (plain, DySCO, chat, token ids, a long plain prompt (2048
     tokens) and a long DySCO one (1024), a cancel, a deadline, refused ones) and a few concurrent
     streams; then the server's RSS ("before");
  2. load for --duration seconds: --concurrency worker threads pick random requests (plain and
     DySCO streams with random inputs, stops and sampling; client cancels after a few tokens; short
     deadlines; requests with bad fields; unparseable bytes; Tokenize / GetModelInfo), and a chaos
     thread runs the rare ones on a schedule (the first once, the rest in every 100 s): a prompt at
     the context limit (GetModelInfo's max_context_tokens), a slow reader (`dysco-client generate
     --read-delay-ms 300`: a small HTTP/2 window and a pause after every message, so the server
     coalesces), a vanished client (a
     dysco-client SIGKILLed after its first token: its connection just goes away), a vanished slow
     reader, a burst past --max-queued (RESOURCE_EXHAUSTED), a cancel and a deadline;
  3. checks, printed as one table: requests sent and their outcomes by gRPC code (client side);
     dysco_requests_running = 0, dysco_requests_waiting = 0, dysco_kv_cache_usage_ratio = 0 on
     /metrics within a bounded wait; every dysco_requests_total{finish_reason,dysco} and
     dysco_requests_refused_total{code} equal to what the client saw; the RSS after the load within
     --rss-bound-mb of the RSS before; health "" and "dysco.v1.Generation" SERVING; the server
     alive throughout and exiting 0 on SIGTERM.
Exits 1 on any mismatch, unexpected outcome, crash or timeout (2 for bad usage).

Every loop is bounded in count and time: workers stop issuing at the end of --duration, every RPC
carries a deadline, child processes are killed after a bounded wait, and a watchdog ends the whole
run (killing the server) at duration + the long prompt's deadline + 900 s; the server gets SIGKILL
if the soak itself dies (PR_SET_PDEATHSIG).

Why the counts can be exact: a client cancel is sent only after the stream's first token (so the
server has a session to count) on requests with max_new_tokens 384, which cannot end on their own
in the few steps between the client reading a token and its cancel arriving; deadlines are >= 0.3 s
on the same long requests; refused requests carry no short deadline. A stream that did finish
before its cancel is counted by the finish reason it received. The server tells a deadline from a
client cancel by the clock (OnCancel: a cancel within 1 s of the deadline is the deadline; 20 ms was
too little, which this test found). A stream the client saw end DEADLINE_EXCEEDED that the server
counted as "cancelled" fails the run; --lenient-deadlines lists such streams (found by request id in
the server's request_finish lines) and expects them as the log says instead.

Why RSS is bounded by +100 MB by default: the KV pool and the weights are allocated at load, and the
warm-up runs every request shape once (allocator arenas of the gRPC and worker threads, the
longest attention buffers of chunked prefill) before "before" is taken; measured growth over a
full run is -72 to +21 MB. A leak of one KV page (0.7 MB) or one request's logits (0.2 MB) per request
over the few hundred requests of a run exceeds it.

Usage: .venv/bin/python tools/soak.py [--duration S] [--ci] [--seed N] [--concurrency N] ...
(--help lists them). DYSCO_SERVER_BIN / DYSCO_CLIENT_BIN / DYSCO_MODEL_DIR override the default paths.
"""

import argparse
import collections
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SERVER_BIN = Path(os.environ.get("DYSCO_SERVER_BIN", REPO / "build" / "bin" / "dysco-server"))
DEFAULT_MODEL_DIR = Path(os.environ.get("DYSCO_MODEL_DIR", REPO / "models" / "smollm2-135m-instruct"))
DEFAULT_CLIENT_BIN = Path(os.environ.get("DYSCO_CLIENT_BIN", REPO / "build" / "bin" / "dysco-client"))

VICTIM_MAX_NEW = 384  # cancel / deadline / vanish victims: far more steps than they are given
SLOW_READ_MS = 300  # a slow reader's pause after every message
# A slow reader whose messages came less than this many read delays apart was the slow side of its
# stream: the server generated faster than it read, so the server must have coalesced tokens.
READER_BOUND_FACTOR = 1.5
FILLER = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his "
    "father had taught him. Below, the harbour filled with fishing boats returning from the northern banks, "
    "their decks heavy with cod and mackerel. Merchants argued over prices on the quay while children chased "
    "gulls between the barrels. In the village school, the teacher explained how tides follow the moon, how "
    "salt is drawn from the sea in shallow pans, and why the river that feeds the bay runs brown after the "
    "spring rains. Travellers who stayed at the inn by the bridge wrote letters about the bread, the weather, "
    "the long summer evenings and the sound of bells from the church on the hill. Farmers brought apples, "
    "barley and wool to the Saturday market, and a blacksmith repaired ploughs, hinges and the iron gate of "
    "the cemetery. Each winter the storms tested the sea wall, and each spring the villagers mended it with "
    "stone carried down from the quarry above the forest, where deer grazed in the clearings at dawn.")
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea.",
    "List three fruits.",
    "Once upon a time, in a small village,",
    "Explain in two sentences why the sky is blue.",
    "Count from one to ten.",
    "The best way to learn a language is",
]
FINISH_NAMES = {1: "stop", 2: "length", 3: "stop_string"}  # proto FinishReason -> metric label
FINISH_BY_NAME = {"STOP": "stop", "LENGTH": "length", "STOP_STRING": "stop_string"}
REFUSED_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE")
# Raw request bodies no protobuf parser accepts (for GenerateRequest / TokenizeRequest), and one
# GetModelInfoRequest (no fields: only broken framing fails it).
UNPARSEABLE = [
    b"\x0a\x03\xff\xfe\xfd",              # field 1 (a string) that is not UTF-8
    b"\x0a\xff\xff\xff\xff\x0f",          # a length past the end
    b"\x08" + b"\xff" * 11,               # a varint of 11 bytes
    b"\x0f\x00",                          # wire type 7
]
UNPARSEABLE_INFO = [b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 11]


def now():
    return time.monotonic()


def _die_with_parent():
    """In the server's child process before exec: SIGKILL it when the process that started it dies, so
    that a soak killed from outside (a CI timeout) leaves no server behind."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_stubs(out_dir):
    """Generates the Python stubs of proto/ into out_dir and imports them."""
    subprocess.run(["bash", str(REPO / "tools" / "gen_python_stubs.sh"), str(out_dir)], check=True,
                   env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    return import_stubs(out_dir)


def import_stubs(out_dir):
    sys.path.insert(0, str(out_dir))
    try:
        import generation_pb2
        import generation_pb2_grpc
        import health_pb2
        import health_pb2_grpc
    finally:
        sys.path.remove(str(out_dir))

    class Stubs:
        gen = generation_pb2
        gen_grpc = generation_pb2_grpc
        health = health_pb2
        health_grpc = health_pb2_grpc
        dir = str(out_dir)

    return Stubs


# ---- The server process and its endpoints.

class ServerProcess:
    """The real dysco-server on loopback ports; its log goes to log_path (stdout and stderr)."""

    def __init__(self, binary, model_dir, log_path, extra_args=()):
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.args = [str(binary), "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
                     "--metrics-port", str(self.metrics_port), *map(str, extra_args)]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                        preexec_fn=_die_with_parent)

    @property
    def pid(self):
        return self.process.pid

    def alive(self):
        return self.process.poll() is None

    def log_tail(self, n=30):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self, pb, grpc, timeout_s=180):
        """Waits (bounded) until readiness is SERVING; raises RuntimeError with the log tail otherwise."""
        channel = grpc.insecure_channel(self.target)
        health = pb.health_grpc.HealthStub(channel)
        give_up = now() + timeout_s
        try:
            while now() < give_up:
                if not self.alive():
                    raise RuntimeError(f"dysco-server exited with {self.process.returncode} during startup:\n"
                                       f"{self.log_tail()}")
                try:
                    reply = health.Check(pb.health.HealthCheckRequest(service="dysco.v1.Generation"), timeout=2)
                    if reply.status == pb.health.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        finally:
            channel.close()
        raise RuntimeError(f"dysco-server not SERVING after {timeout_s} s:\n{self.log_tail()}")

    def rss_mb(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        raise RuntimeError("no VmRSS")

    def scrape(self):
        return scrape(self.metrics_port)

    def stop(self, timeout_s=60):
        """SIGTERM (drain), then the exit code; SIGKILL after timeout_s (returns None then)."""
        try:
            if self.alive():
                self.process.send_signal(signal.SIGTERM)
                try:
                    return self.process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=30)
                    return None
            return self.process.returncode
        finally:
            self._log.close()


LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(metrics_port, timeout_s=10):
    """GET /metrics -> list of (name, {label: value}, float)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=timeout_s) as reply:
        body = reply.read().decode()
    series = []
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        if m:
            series.append((m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return series


def series_sum(series, name, **labels):
    return sum(v for n, l, v in series if n == name and all(l.get(k) == x for k, x in labels.items()))


def idle(series):
    return (series_sum(series, "dysco_requests_running") == 0 and series_sum(series, "dysco_requests_waiting") == 0
            and series_sum(series, "dysco_kv_cache_usage_ratio") == 0)


def wait_idle(server, timeout_s=60):
    """Polls /metrics until nothing runs or waits and the KV cache is empty; returns (idle?, last scrape)."""
    give_up = now() + timeout_s
    last = server.scrape()
    while not idle(last) and now() < give_up:
        time.sleep(0.1)
        last = server.scrape()
    return idle(last), last


def health_status(pb, grpc, target, service):
    channel = grpc.insecure_channel(target)
    try:
        reply = pb.health_grpc.HealthStub(channel).Check(pb.health.HealthCheckRequest(service=service), timeout=10)
        return pb.health.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as e:
        return e.code().name
    finally:
        channel.close()


# ---- Slow and vanishing clients: build/bin/dysco-client generate in a child process.

class ClientProcess:
    """One `dysco-client generate --json` call in a child process: one JSON line per stream message on
    stdout; with read_delay_ms a slow reader (small HTTP/2 window, a pause after every message)."""

    def __init__(self, client_bin, target, request_args, request_id, read_delay_ms=0, timeout_s=120):
        self.args = [str(client_bin), "generate", "--target", target, "--json", "--request-id", request_id,
                     "--timeout-ms", str(int(timeout_s * 1000)), "--read-delay-ms", str(int(read_delay_ms)),
                     *map(str, request_args)]
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buffer = b""
        self._eof = False
        self.messages = []
        self.arrivals = []  # when each message was read here (the child prints it once it has read it)

    def next_message(self, timeout_s):
        """The next stream message (a dict), or None at the end of its output or after timeout_s."""
        give_up = now() + timeout_s
        while b"\n" not in self._buffer and not self._eof:
            left = give_up - now()
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, left))
            if not ready:
                return None
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                self._eof = True
            self._buffer += chunk
        if b"\n" not in self._buffer:
            return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            message = {"unparsed": line.decode(errors="replace")}
        self.messages.append(message)
        self.arrivals.append(now())
        return message

    def mean_interval_ms(self):
        """Mean time between messages after the first (which waits for the prompt), or None."""
        if len(self.arrivals) < 3:
            return None
        return (self.arrivals[-1] - self.arrivals[1]) / (len(self.arrivals) - 2) * 1000.0

    def finish(self, timeout_s):
        """Waits (bounded; SIGKILL after timeout_s) for the end: (gRPC code name, messages, tokens,
        finish reason name or None)."""
        give_up = now() + timeout_s
        while self.next_message(max(0.0, give_up - now())) is not None:
            pass
        try:
            rc = self.process.wait(timeout=max(1.0, give_up - now()))
        except subprocess.TimeoutExpired:
            self.kill()
            return "CLIENT_TIMEOUT", len(self.messages), self.tokens(), None
        stderr = self.process.stderr.read().decode(errors="replace")
        self.close()
        finish = None
        for message in self.messages:
            if message.get("finish_reason", "FINISH_REASON_UNSPECIFIED") != "FINISH_REASON_UNSPECIFIED":
                finish = message["finish_reason"]
        if rc == 0:
            return "OK", len(self.messages), self.tokens(), finish
        m = re.search(r"error: Generate: ([A-Z_]+):", stderr)
        return (m.group(1) if m else f"EXIT_{rc}"), len(self.messages), self.tokens(), finish

    def tokens(self):
        return sum(len(m.get("token_ids", [])) for m in self.messages)

    def kill(self):
        """SIGKILL: the process, and with it its connection, vanishes."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.close()

    def close(self):
        for f in (self.process.stdout, self.process.stderr):
            if f is not None and not f.closed:
                f.close()


# ---- Client-side bookkeeping.

class Tally:
    """What the client sent and saw. expected_finished / expected_refused are what the server's counters
    must say; unexpected collects every outcome a scenario does not allow."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = collections.Counter()           # scenario -> RPCs
        self.outcomes = collections.Counter()       # (scenario, code) -> RPCs
        self.codes = collections.Counter()          # code -> RPCs (all methods)
        self.expected_finished = collections.Counter()  # (finish_reason, "on"|"off") -> sessions
        self.expected_refused = collections.Counter()   # code -> RPCs
        self.unexpected = []
        self.tokens_received = 0
        self.ok_generated = 0      # usage.generated_tokens of streams that finished OK
        self.slow_messages = []    # (messages, tokens, mean gap ms) of slow readers that finished
        self.deadline_ids = {}     # request id -> DySCO?, of the streams that ended DEADLINE_EXCEEDED

    def record(self, scenario, code, allowed, detail=""):
        with self.lock:
            self.sent[scenario] += 1
            self.outcomes[(scenario, code)] += 1
            self.codes[code if code != "VANISHED" else "(vanished)"] += 1
            if code in REFUSED_CODES:
                self.expected_refused[code] += 1
            if code not in allowed:
                self.unexpected.append(f"{scenario}: {code} {detail}".strip())

    def finished(self, reason, dysco, request_id=None):
        with self.lock:
            self.expected_finished[(reason, "on" if dysco else "off")] += 1
            if reason == "deadline_exceeded" and request_id:
                self.deadline_ids[request_id] = dysco

    def totals(self):
        with self.lock:
            return sum(self.expected_finished.values()), sum(self.expected_refused.values())

    def problem(self, text):
        with self.lock:
            self.unexpected.append(text)


class StreamResult:
    def __init__(self):
        self.code = None
        self.details = ""
        self.messages = 0
        self.ids = []
        self.final = None
        self.selections = 0


# ---- The soak itself.

class Soak:
    def __init__(self, args, pb, grpc, server):
        self.args = args
        self.pb = pb
        self.grpc = grpc
        self.server = server
        self.rng = random.Random(args.seed)
        self.rng_lock = threading.Lock()
        self.tally = Tally()
        self.channel = grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb.gen_grpc.GenerationStub(self.channel)
        self.raw_generate = self.channel.unary_stream("/dysco.v1.Generation/Generate")
        self.raw_tokenize = self.channel.unary_unary("/dysco.v1.Generation/Tokenize")
        self.raw_info = self.channel.unary_unary("/dysco.v1.Generation/GetModelInfo")
        self.next_id = 0
        self.children = []
        self.long_ok = 0
        info = self.stub.GetModelInfo(pb.gen.GetModelInfoRequest(), timeout=30)
        self.tally.record("info", "OK", {"OK"})
        self.info = info
        self.max_context = info.limits.max_context_tokens
        self.vocab = info.vocab_size
        pool = self.stub.Tokenize(pb.gen.TokenizeRequest(text=FILLER), timeout=30).token_ids
        self.tally.record("tokenize", "OK", {"OK"})
        self.pool = list(pool)
        self.rpc_timeout = args.rpc_timeout

    # -- helpers
    def rand(self):
        with self.rng_lock:
            return random.Random(self.rng.getrandbits(64))

    def request_id(self, scenario):
        with self.rng_lock:
            self.next_id += 1
            return f"soak-{scenario}-{self.next_id}"

    def ids(self, n, offset):
        return [self.pool[(offset + i) % len(self.pool)] for i in range(n)]

    def stream(self, request, timeout, on_message=None, stub=None):
        result = StreamResult()
        call = (stub or self.stub).Generate(request, timeout=timeout)
        try:
            for message in call:
                result.messages += 1
                result.ids.extend(message.token_ids)
                result.selections += len(message.selection)
                if message.finish_reason:
                    result.final = message
                if on_message is not None:
                    on_message(result, call)
            result.code = "OK"
        except self.grpc.RpcError as e:
            result.code = e.code().name
            result.details = e.details() or ""
        return result

    def account(self, scenario, request, result, allowed):
        """Records one Generate stream: its code, and the session the server must have counted."""
        dysco = request.dysco.enabled
        with self.tally.lock:
            self.tally.tokens_received += len(result.ids)
        detail = f"{request.request_id} {result.details[:200]}"
        if result.code == "OK":
            if result.final is None or result.final.finish_reason not in FINISH_NAMES:
                self.tally.record(scenario, "OK", allowed)
                self.tally.problem(f"{scenario}: {request.request_id} ended OK without a finish reason")
                return
            if result.final.usage.generated_tokens != len(result.ids):
                self.tally.problem(f"{scenario}: {request.request_id} usage says "
                                   f"{result.final.usage.generated_tokens} tokens, {len(result.ids)} arrived")
            with self.tally.lock:
                self.tally.ok_generated += result.final.usage.generated_tokens
            self.tally.finished(FINISH_NAMES[result.final.finish_reason], dysco)
        elif result.code == "CANCELLED":
            self.tally.finished("cancelled", dysco)
        elif result.code == "DEADLINE_EXCEEDED":
            self.tally.finished("deadline_exceeded", dysco, request.request_id)
        elif result.code == "INTERNAL":
            self.tally.finished("error", dysco)
        self.tally.record(scenario, result.code, allowed, detail)

    def random_stream_request(self, r, dysco, scenario):
        pb = self.pb
        # DySCO needs a prompt longer than its warm-ups (8 + 2 tokens by default): no bare short prompts.
        kind = r.choice(["chat", "messages", "ids"] if dysco else ["prompt", "chat", "messages", "ids"])
        if kind == "prompt":
            request = pb.gen.GenerateRequest(prompt=r.choice(PROMPTS))
        elif kind == "chat":
            request = pb.gen.GenerateRequest(prompt=r.choice(PROMPTS), chat=True)
        elif kind == "messages":
            request = pb.gen.GenerateRequest(messages=pb.gen.ChatMessages(messages=[
                pb.gen.ChatMessage(role="system", content="You are concise."),
                pb.gen.ChatMessage(role="user", content=r.choice(PROMPTS))]))
        else:
            request = pb.gen.GenerateRequest(token_ids=pb.gen.TokenIds(
                ids=self.ids(r.randint(16, min(256, self.max_context // 4)), r.randrange(len(self.pool)))))
        request.max_new_tokens = r.randint(1, 40)
        if r.random() < 0.3:
            request.stop.append(r.choice([".", " the", "\n", ","]))
        if r.random() < 0.1:
            request.stop_token_ids.append(r.choice(self.pool[:50]))
        if r.random() < 0.3:
            request.sampling.temperature = 0.8
            request.sampling.top_p = 0.95
            request.sampling.seed = r.getrandbits(32)
        if dysco:
            request.dysco.enabled = True
            request.return_selection = r.random() < 0.3
        request.request_id = self.request_id(scenario)
        return request

    def victim_request(self, r, scenario, dysco=None):
        request = self.pb.gen.GenerateRequest(
            token_ids=self.pb.gen.TokenIds(ids=self.ids(r.randint(16, 200), r.randrange(len(self.pool)))),
            max_new_tokens=VICTIM_MAX_NEW)
        request.dysco.enabled = r.random() < 0.4 if dysco is None else dysco
        request.request_id = self.request_id(scenario)
        return request

    # -- scenarios
    def plain(self, r, dysco=False):
        scenario = "dysco" if dysco else "plain"
        request = self.random_stream_request(r, dysco, scenario)
        self.account(scenario, request, self.stream(request, self.rpc_timeout), {"OK", "RESOURCE_EXHAUSTED"})

    def dysco(self, r):
        self.plain(r, dysco=True)

    def cancel(self, r, dysco=None):
        request = self.victim_request(r, "cancel", dysco)
        after = r.randint(1, 4)

        def on_message(result, call):
            if result.final is None and len(result.ids) >= after:
                call.cancel()

        self.account("cancel", request, self.stream(request, self.rpc_timeout, on_message),
                     {"CANCELLED", "OK", "RESOURCE_EXHAUSTED"})

    def deadline(self, r, dysco=None):
        request = self.victim_request(r, "deadline", dysco)
        self.account("deadline", request, self.stream(request, r.uniform(0.3, 2.0)),
                     {"DEADLINE_EXCEEDED", "OK", "RESOURCE_EXHAUSTED"})

    def malformed(self, r):
        pb = self.pb
        ok = lambda: pb.gen.GenerateRequest(prompt="Hello", max_new_tokens=4)  # noqa: E731

        def edit(f):
            request = ok()
            f(request)
            return request

        cases = [
            ("top_p", lambda q: setattr(q.sampling, "top_p", 1.5)),
            ("temperature", lambda q: setattr(q.sampling, "temperature", -1.0)),
            ("repetition_penalty", lambda q: setattr(q.sampling, "repetition_penalty", 0.0)),
            ("no input", lambda q: q.ClearField("prompt")),
            ("empty prompt", lambda q: setattr(q, "prompt", "")),
            ("token id >= vocab", lambda q: q.token_ids.ids.extend([1, self.vocab])),
            ("negative token id", lambda q: q.token_ids.ids.extend([-1])),
            ("chat with token ids", lambda q: (q.token_ids.ids.extend([5]), setattr(q, "chat", True))),
            ("max_new_tokens over the limit", lambda q: setattr(q, "max_new_tokens", self.info.limits.max_new_tokens + 1)),
            ("empty stop", lambda q: q.stop.append("")),
            ("unknown role", lambda q: q.messages.messages.add(role="robot", content="hi")),
            ("request id with a newline", lambda q: setattr(q, "request_id", "a\nb")),
            ("dysco decay", lambda q: (setattr(q.dysco, "enabled", True), setattr(q.dysco, "decay_factor", 1.5))),
            ("dysco head", lambda q: (setattr(q.dysco, "enabled", True), q.dysco.selected_heads.add(layer=99, head=0))),
            ("prompt over the context",
             lambda q: q.token_ids.ids.extend(self.ids(self.max_context + 1, r.randrange(len(self.pool))))),
        ]
        name, f = r.choice(cases)
        request = edit(f)
        result = self.stream(request, 60)
        if result.code == "INVALID_ARGUMENT" and result.messages:
            self.tally.problem(f"malformed {name}: messages before the error")
        self.tally.record("malformed", result.code, {"INVALID_ARGUMENT"}, f"{name}: {result.details[:200]}")

    def unparseable(self, r):
        which = r.choice(["generate", "generate", "tokenize", "info"])
        try:
            if which == "generate":
                list(self.raw_generate(r.choice(UNPARSEABLE), timeout=60))
            elif which == "tokenize":
                self.raw_tokenize(r.choice(UNPARSEABLE), timeout=60)
            else:
                self.raw_info(r.choice(UNPARSEABLE_INFO), timeout=60)
            code, details = "OK", ""
        except self.grpc.RpcError as e:
            code, details = e.code().name, e.details() or ""
        if code == "INVALID_ARGUMENT" and "cannot be parsed" not in details:
            self.tally.problem(f"unparseable {which}: message does not say so: {details[:200]}")
        self.tally.record("unparseable", code, {"INVALID_ARGUMENT"}, f"{which}: {details[:200]}")

    def unary(self, r):
        pb = self.pb
        which = r.choice(["tokenize", "tokenize_chat", "info", "tokenize_empty"])
        try:
            if which == "tokenize":
                self.stub.Tokenize(pb.gen.TokenizeRequest(text=r.choice(PROMPTS)), timeout=60)
            elif which == "tokenize_chat":
                self.stub.Tokenize(pb.gen.TokenizeRequest(text=r.choice(PROMPTS), chat=True), timeout=60)
            elif which == "info":
                self.stub.GetModelInfo(pb.gen.GetModelInfoRequest(), timeout=60)
            else:
                self.stub.Tokenize(pb.gen.TokenizeRequest(), timeout=60)
            code = "OK"
        except self.grpc.RpcError as e:
            code = e.code().name
        allowed = {"INVALID_ARGUMENT"} if which == "tokenize_empty" else {"OK"}
        self.tally.record("tokenize/info" if which != "tokenize_empty" else "malformed", code, allowed, which)

    def long_prompt(self, r, dysco=False, length=None):
        """A prompt at the context limit: the stream ends by length when prompt + generated reach it."""
        length = length or self.max_context - 3
        request = self.pb.gen.GenerateRequest(
            token_ids=self.pb.gen.TokenIds(ids=self.ids(length, r.randrange(len(self.pool)))), max_new_tokens=8)
        request.dysco.enabled = dysco
        request.request_id = self.request_id("long")
        result = self.stream(request, self.args.long_timeout)
        self.account("long", request, result, {"OK"})
        if result.code == "OK":
            with self.tally.lock:
                self.long_ok += 1

    def client_process(self, r, scenario, read_delay_ms, victim):
        """A dysco-client child: a victim (token ids, 384 new tokens, DySCO sometimes) or a chat answer."""
        request_id = self.request_id(scenario.replace(" ", "-"))
        dysco = victim and r.random() < 0.4
        if victim:
            request_args = ["--token-ids", ",".join(map(str, self.ids(r.randint(16, 200), r.randrange(len(self.pool))))),
                            "--max-new-tokens", VICTIM_MAX_NEW] + (["--dysco"] if dysco else [])
        else:
            request_args = ["--prompt", r.choice(PROMPTS), "--chat", "--max-new-tokens", 48]
        child = ClientProcess(self.args.client_bin, self.server.target, request_args, request_id, read_delay_ms,
                              timeout_s=self.rpc_timeout)
        return child, request_id, dysco

    def account_child(self, scenario, child_result, dysco, allowed, request_id):
        code, messages, tokens, finish = child_result
        with self.tally.lock:
            self.tally.tokens_received += tokens
        if code == "OK":
            if finish not in FINISH_BY_NAME:
                self.tally.problem(f"{scenario}: {request_id} ended OK without a finish reason")
            else:
                self.tally.finished(FINISH_BY_NAME[finish], dysco)
        elif code == "CANCELLED":
            self.tally.finished("cancelled", dysco)
        elif code == "DEADLINE_EXCEEDED":
            self.tally.finished("deadline_exceeded", dysco, request_id)
        elif code == "INTERNAL":
            self.tally.finished("error", dysco)
        self.tally.record(scenario, code, allowed, request_id)

    def slow_reader(self, r):
        """dysco-client reading one message every 300 ms through a small window: the server coalesces."""
        child, request_id, dysco = self.client_process(r, "slow reader", SLOW_READ_MS, victim=False)
        result = child.finish(self.rpc_timeout + 30)
        self.account_child("slow reader", result, dysco, {"OK", "RESOURCE_EXHAUSTED"}, request_id)
        if result[0] == "OK":
            with self.tally.lock:
                self.tally.slow_messages.append((result[1], result[2], child.mean_interval_ms()))

    def vanish(self, r, slow=False):
        """A dysco-client SIGKILLed mid-stream (after its first token): its connection just goes away."""
        scenario = "vanished slow reader" if slow else "vanished client"
        child, request_id, dysco = self.client_process(r, scenario, 500 if slow else 0, victim=True)
        try:
            first = None
            give_up = now() + self.rpc_timeout
            while now() < give_up:
                message = child.next_message(give_up - now())
                if message is None or message.get("token_ids"):
                    first = message
                    break
            if first is not None and first.get("finish_reason", "FINISH_REASON_UNSPECIFIED") == \
                    "FINISH_REASON_UNSPECIFIED":
                # A slow reader first lets the server's writes pile up against its closed window.
                time.sleep(r.uniform(1.0, 3.0) if slow else r.uniform(0.0, 1.0))
                if child.process.poll() is None:
                    child.kill()
                    with self.tally.lock:
                        self.tally.tokens_received += child.tokens()
                    self.tally.finished("cancelled", dysco)
                    self.tally.record(scenario, "VANISHED", {"VANISHED"}, request_id)
                    return
            # It ended (or failed) on its own before it could be killed: counted by what it saw.
            self.account_child(scenario, child.finish(30), dysco, {"VANISHED", "OK", "RESOURCE_EXHAUSTED"},
                               request_id)
        finally:
            if child.process.poll() is None:
                child.kill()

    def burst(self, r, n=None):
        """More requests at once than the queue holds: the surplus is RESOURCE_EXHAUSTED at once."""
        n = n or self.args.max_queued + self.args.max_batch + 16
        calls = []
        for i in range(n):
            request = self.pb.gen.GenerateRequest(token_ids=self.pb.gen.TokenIds(ids=self.ids(8, r.randrange(1000))),
                                                  max_new_tokens=2)
            request.request_id = self.request_id("burst")
            calls.append((request, self.stub.Generate(request, timeout=self.rpc_timeout)))
        for request, call in calls:
            result = StreamResult()
            try:
                for message in call:
                    result.messages += 1
                    result.ids.extend(message.token_ids)
                    if message.finish_reason:
                        result.final = message
                result.code = "OK"
            except self.grpc.RpcError as e:
                result.code, result.details = e.code().name, e.details() or ""
            self.account("burst", request, result, {"OK", "RESOURCE_EXHAUSTED"})

    # -- phases
    def warmup(self):
        r = self.rand()
        self.plain(r)
        self.plain(r, dysco=True)
        self.long_prompt(r, length=min(self.max_context - 3, 2048))
        self.long_prompt(r, dysco=True, length=min(self.max_context - 3, 1024))
        self.cancel(r, dysco=False)
        self.deadline(r, dysco=True)
        self.malformed(r)
        self.unparseable(r)
        threads = [threading.Thread(target=self.plain, args=(self.rand(), i % 2 == 1)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.rpc_timeout + 30)

    def worker(self, end_time, r):
        choices = [(self.plain, 30), (self.dysco, 20), (self.cancel, 15), (self.deadline, 15), (self.malformed, 8),
                   (self.unparseable, 5), (self.unary, 7)]
        funcs, weights = zip(*choices)
        while now() < end_time and self.server.alive():
            r.choices(funcs, weights)[0](r)

    def chaos(self, start, end_time, r):
        """The rare scenarios on a schedule: the prompt at the context limit once, at the start; the rest
        in every cycle of min(duration, 100) s, at fixed fractions of it."""
        period = min(end_time - start, 100.0)
        cycle = [(0.05, lambda: self.cancel(r, dysco=True)),
                 (0.10, lambda: self.deadline(r, dysco=False)),
                 (0.15, lambda: self.slow_reader(r)),
                 (0.25, lambda: self.vanish(r)),
                 (0.40, lambda: self.vanish(r, slow=True)),
                 (0.55, lambda: self.burst(r)),
                 (0.65, lambda: self.unparseable(r)),
                 (0.70, lambda: self.slow_reader(r)),
                 (0.80, lambda: self.vanish(r, slow=r.random() < 0.5))]
        schedule = [(0.0, lambda: self.long_prompt(r))]
        k = 0
        while start + k * period < end_time:
            schedule += [(k * period + f * period, action) for f, action in cycle]
            k += 1
        for offset, action in schedule:
            wait = start + offset - now()
            if wait > 0:
                time.sleep(wait)
            if now() >= end_time or not self.server.alive():
                return
            action()

    def load(self, duration):
        start = now()
        end_time = start + duration
        threads = [threading.Thread(target=self.worker, args=(end_time, self.rand()), daemon=True)
                   for _ in range(self.args.concurrency)]
        threads.append(threading.Thread(target=self.chaos, args=(start, end_time, self.rand()), daemon=True))
        for t in threads:
            t.start()
        give_up = end_time + self.args.long_timeout + 60
        for t in threads:
            t.join(max(0.0, give_up - now()))
        stuck = sum(t.is_alive() for t in threads)
        if stuck:
            self.tally.problem(f"{stuck} client threads still running {give_up - end_time:.0f} s after the end")
        return now() - start


# ---- Checks and the table.

def compare_counters(series, tally):
    """Rows (counter, server, client, ok?) for every finish reason / refused code either side has."""
    rows = []
    server_finished = collections.Counter()
    for name, labels, value in series:
        if name == "dysco_requests_total":
            server_finished[(labels.get("finish_reason"), labels.get("dysco"))] += value
    keys = set(k for k, v in server_finished.items() if v) | set(tally.expected_finished)
    for reason, dysco in sorted(keys):
        s, c = server_finished[(reason, dysco)], tally.expected_finished[(reason, dysco)]
        rows.append((f'dysco_requests_total{{finish_reason="{reason}",dysco="{dysco}"}}', s, c, s == c))
    server_refused = collections.Counter()
    for name, labels, value in series:
        if name == "dysco_requests_refused_total":
            server_refused[labels.get("code")] += value
    for code in sorted(set(k for k, v in server_refused.items() if v) | set(tally.expected_refused)):
        s, c = server_refused[code], tally.expected_refused[code]
        rows.append((f'dysco_requests_refused_total{{code="{code}"}}', s, c, s == c))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=None, help="seconds of load (default 300; --ci: 60)")
    parser.add_argument("--ci", action="store_true",
                        help="the short form: 60 s, --max-context 1024, --kv-pages 384 unless given")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=5, help="worker threads issuing requests")
    parser.add_argument("--max-context", type=int, default=None,
                        help="server --max-context (default: the model's; --ci: 1024)")
    parser.add_argument("--kv-pages", type=int, default=None, help="server --kv-pages (default 1024; --ci: 384)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queued", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="server --threads")
    parser.add_argument("--rss-bound-mb", type=float, default=100.0,
                        help="largest allowed RSS growth from after the warm-up to after the load")
    parser.add_argument("--rpc-timeout", type=float, default=180.0, help="deadline of ordinary streams")
    parser.add_argument("--long-timeout", type=float, default=None,
                        help="deadline of the context-limit prompt (default 600; --ci: 120)")
    parser.add_argument("--server-bin", default=str(DEFAULT_SERVER_BIN))
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--client-bin", default=str(DEFAULT_CLIENT_BIN),
                        help="dysco-client, the slow and vanishing readers")
    parser.add_argument("--log", default=None, help="keep the server log here (default: a temp dir)")
    parser.add_argument("--lenient-deadlines", action="store_true",
                        help="do not fail when the server counts a stream the client saw end "
                             "DEADLINE_EXCEEDED as cancelled; expect it as the server's log says")
    parser.add_argument("--json", default=None, help="also write the figures as JSON to this file")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 60.0 if args.ci else 300.0
    if args.max_context is None:
        args.max_context = 1024 if args.ci else 0
    if args.kv_pages is None:
        args.kv_pages = 384 if args.ci else 1024
    if args.long_timeout is None:
        args.long_timeout = 120.0 if args.ci else 600.0
    if args.duration <= 0 or args.concurrency < 1:
        parser.error("--duration must be > 0 and --concurrency >= 1")

    try:
        import grpc
    except ImportError:
        print("soak: grpcio is missing (run it with .venv/bin/python)", file=sys.stderr)
        return 2
    if not Path(args.server_bin).is_file():
        print(f"soak: {args.server_bin} is missing (make build)", file=sys.stderr)
        return 2
    if not Path(args.client_bin).is_file():
        print(f"soak: {args.client_bin} is missing (make build)", file=sys.stderr)
        return 2
    if not (Path(args.model) / "model.pt").is_file():
        print(f"soak: {args.model} is not a model package (make model)", file=sys.stderr)
        return 2

    t0 = now()
    work = Path(tempfile.mkdtemp(prefix="dysco-soak-"))
    pb = load_stubs(work / "stubs")
    log_path = Path(args.log) if args.log else work / "dysco-server.log"
    server_args = ["--kv-pages", args.kv_pages, "--max-batch", args.max_batch, "--max-queued", args.max_queued,
                   "--threads", args.threads, "--drain-timeout", 30]
    if args.max_context:
        server_args += ["--max-context", args.max_context]
    server = ServerProcess(args.server_bin, args.model, log_path, server_args)

    # The watchdog: whatever hangs, the run ends.
    hard_limit = args.duration + args.long_timeout + 900

    def watchdog():
        print(f"soak: FAIL: the run exceeded its hard limit of {hard_limit:.0f} s; killing the server",
              file=sys.stderr, flush=True)
        server.process.kill()
        os._exit(1)

    timer = threading.Timer(hard_limit, watchdog)
    timer.daemon = True
    timer.start()

    failures = []
    figures = {}
    soak = None
    try:
        server.wait_ready(pb, grpc)
        soak = Soak(args, pb, grpc, server)
        print(f"soak: server pid {server.pid} on {server.target} (metrics :{server.metrics_port}); "
              f"max_context {soak.max_context}, kv_pages {soak.info.limits.kv_cache_pages}, "
              f"max_batch {args.max_batch}, max_queued {args.max_queued}; log {log_path}", flush=True)
        t_warm = now()
        soak.warmup()
        ok, _ = wait_idle(server)
        if not ok:
            failures.append("not idle after the warm-up")
        rss_before = server.rss_mb()
        warm_s = now() - t_warm
        print(f"soak: warm-up done in {warm_s:.1f} s, RSS {rss_before:.1f} MB; load for {args.duration:.0f} s "
              f"with {args.concurrency} workers + chaos", flush=True)
        load_s = soak.load(args.duration)
        if not server.alive():
            failures.append(f"dysco-server died during the load (exit {server.process.returncode})")
            raise RuntimeError("server died")
        # Gauges back to idle, then the counters (a session is counted when it ends, which may be just
        # after the client saw its status): poll until they agree, bounded.
        t_idle = now()
        ok, series = wait_idle(server, 60)
        idle_s = now() - t_idle
        if not ok:
            failures.append("running / waiting / KV usage not back to 0 within 60 s")
        give_up = now() + 15

        def server_totals(s):
            return series_sum(s, "dysco_requests_total"), series_sum(s, "dysco_requests_refused_total")

        while server_totals(series) != soak.tally.totals() and now() < give_up:
            time.sleep(0.2)
            series = server.scrape()
        rss_after = server.rss_mb()
        health_live = health_status(pb, grpc, server.target, "")
        health_ready = health_status(pb, grpc, server.target, "dysco.v1.Generation")
        soak.channel.close()
        exit_code = server.stop()
        t = soak.tally
        log_text = log_path.read_text(errors="replace")
        error_lines = [line for line in log_text.splitlines() if "level=error" in line or "level=critical" in line]
        # A stream the client saw end DEADLINE_EXCEEDED but the server ended as "cancelled": gRPC reports
        # both through OnCancel and the server tells them apart by the clock (1 s slack). Found by
        # request id in the server's request_finish lines and listed; a failure unless
        # --lenient-deadlines, which expects them as the server's log says.
        logged = dict(re.findall(r'event=request_finish request_id="([^"]*)" finish_reason=(\w+)', log_text))
        reclassified = sorted(i for i in t.deadline_ids if logged.get(i) == "cancelled")
        for request_id in reclassified:
            label = "on" if t.deadline_ids[request_id] else "off"
            t.expected_finished[("deadline_exceeded", label)] -= 1
            t.expected_finished[("cancelled", label)] += 1
        if reclassified and not args.lenient_deadlines:
            failures.append(f"{len(reclassified)} deadline streams counted as cancelled: {', '.join(reclassified)}")
        rows = compare_counters(series, t)

        # ---- checks
        for name, s, c, same in rows:
            if not same:
                failures.append(f"{name}: server {s:g}, client {c}")
        if t.unexpected:
            failures.append(f"{len(t.unexpected)} unexpected outcomes: " + "; ".join(t.unexpected[:10]))
        if rss_after - rss_before > args.rss_bound_mb:
            failures.append(f"RSS grew {rss_after - rss_before:.1f} MB > {args.rss_bound_mb:g} MB")
        if health_live != "SERVING" or health_ready != "SERVING":
            failures.append(f"health at the end: \"\" {health_live}, readiness {health_ready}")
        if exit_code != 0:
            failures.append(f"dysco-server exit code after SIGTERM: {exit_code}")
        if error_lines:
            failures.append(f"{len(error_lines)} error lines in the server log, first: {error_lines[0][:300]}")
        coverage = {"cancel": "CANCELLED", "deadline": "DEADLINE_EXCEEDED", "vanished client": "VANISHED",
                    "vanished slow reader": "VANISHED", "slow reader": "OK", "long": "OK",
                    "malformed": "INVALID_ARGUMENT", "unparseable": "INVALID_ARGUMENT", "burst": "RESOURCE_EXHAUSTED",
                    "plain": "OK", "dysco": "OK"}
        for scenario, code in coverage.items():
            if not t.outcomes[(scenario, code)]:
                failures.append(f"coverage: no {scenario} request ended {code}")
        # Coalescing is owed only where the reader was the slow side: its messages came about one read
        # delay apart. Where they came further apart the server generated slower than the reader read
        # (a loaded machine), every token could be sent alone, and the check does not apply.
        reader_bound = [(m, n) for m, n, gap in t.slow_messages
                        if gap is not None and gap < READER_BOUND_FACTOR * SLOW_READ_MS]
        if reader_bound and not any(m < n for m, n in reader_bound):
            failures.append(f"slow readers got one message per token: {t.slow_messages}")
        generated_server = series_sum(series, "dysco_generation_tokens_total")
        if generated_server < t.ok_generated:
            failures.append(f"dysco_generation_tokens_total {generated_server:g} < the OK streams' "
                            f"usage.generated_tokens {t.ok_generated}")

        # ---- the table
        total = sum(t.sent.values())
        out = []
        out.append("")
        out.append("=" * 92)
        out.append(f"dysco-server soak: {load_s:.0f} s load (seed {args.seed}, {args.concurrency} workers + chaos), "
                   f"warm-up {warm_s:.0f} s, total {now() - t0:.0f} s")
        out.append(f"model {soak.info.model_name}, max_context {soak.max_context}, "
                   f"kv_pages {soak.info.limits.kv_cache_pages} x {soak.info.limits.kv_page_size}, "
                   f"max_batch {args.max_batch}, max_queued {args.max_queued}, threads {args.threads}")
        out.append("-" * 92)
        out.append(f"{'requests sent (client)':<40}{total:>8}   ({total / max(load_s + warm_s, 1):.2f}/s)")
        for scenario in sorted(t.sent):
            codes = ", ".join(f"{code} {n}" for (s, code), n in sorted(t.outcomes.items()) if s == scenario)
            out.append(f"  {scenario:<38}{t.sent[scenario]:>8}   {codes}")
        out.append(f"{'outcomes by gRPC code (client)':<40}")
        for code, n in sorted(t.codes.items()):
            out.append(f"  {code:<38}{n:>8}")
        out.append(f"{'tokens received (client)':<40}{t.tokens_received:>8}   "
                   f"server dysco_generation_tokens_total {generated_server:g}")
        if t.slow_messages:
            out.append(f"{'slow readers: messages / tokens (gap)':<40}{'':>8}   "
                       + ", ".join(f"{m}/{n} ({'-' if gap is None else f'{gap:.0f} ms'})"
                                   for m, n, gap in t.slow_messages))
        out.append("-" * 92)
        out.append(f"{'counter':<64}{'server':>8}{'client':>8}")
        for name, s, c, same in rows:
            out.append(f"{name:<64}{s:>8g}{c:>8}{'' if same else '   MISMATCH'}")
        if reclassified:
            out.append(f"note: {len(reclassified)} of {len(t.deadline_ids)} DEADLINE_EXCEEDED streams are counted "
                       f"as cancelled by the server (its log says so; the client RST beat the server's deadline "
                       f"timer by > 1 s): {', '.join(reclassified)}")
        out.append("-" * 92)
        out.append(f"{'gauges after the load (idle in)':<40}{idle_s:>7.1f}s   running "
                   f"{series_sum(series, 'dysco_requests_running'):g}, waiting "
                   f"{series_sum(series, 'dysco_requests_waiting'):g}, kv_cache_usage_ratio "
                   f"{series_sum(series, 'dysco_kv_cache_usage_ratio'):g}")
        out.append(f"{'RSS before / after / growth (bound)':<40}{rss_before:>7.1f}  / {rss_after:.1f} MB / "
                   f"{rss_after - rss_before:+.1f} MB (<= +{args.rss_bound_mb:g} MB)")
        out.append(f"{'health at the end':<40}{'':>8}   \"\" {health_live}, dysco.v1.Generation {health_ready}")
        out.append(f"{'server exit after SIGTERM':<40}{str(exit_code):>8}   error lines in its log: "
                   f"{len(error_lines)}")
        out.append("=" * 92)
        for f in failures:
            out.append(f"FAIL: {f}")
        out.append("RESULT: " + ("PASS" if not failures else f"FAIL ({len(failures)})"))
        print("\n".join(out), flush=True)
        figures = {"load_s": load_s, "warmup_s": warm_s, "requests": total, "sent": dict(t.sent),
                   "outcomes": {f"{s}/{c}": n for (s, c), n in t.outcomes.items()}, "codes": dict(t.codes),
                   "counters": [{"name": n, "server": s, "client": c} for n, s, c, _ in rows],
                   "rss_before_mb": rss_before, "rss_after_mb": rss_after, "rss_bound_mb": args.rss_bound_mb,
                   "health": [health_live, health_ready], "exit_code": exit_code, "failures": failures}
    except Exception as e:  # noqa: BLE001 - every failure becomes one FAIL line and exit 1
        failures.append(f"{type(e).__name__}: {e}")
        print(f"soak: FAIL: {type(e).__name__}: {e}\n--- server log tail ---\n{server.log_tail()}",
              file=sys.stderr, flush=True)
    finally:
        if server.alive():
            server.stop()
        timer.cancel()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if failures:
        print(f"soak: server log kept at {log_path}", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)  # the stubs, and the log unless --log put it elsewhere
    return 0


if __name__ == "__main__":
    sys.exit(main())
