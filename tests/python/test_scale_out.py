"""Scale-out beyond one pod with what gRPC already does: client-side round_robin over every address of a target.

Two real dysco-server processes on loopback stand for two pods behind the headless Service; the target
`ipv4:127.0.0.1:P1,127.0.0.1:P2` resolves to both, as `dns:///dysco-headless...` resolves to the pods' IPs.
- 32 streams (8 at a time) from `dysco-client bench` spread over both servers: each serves some (its own
  dysco_requests_total), and together exactly what the client sent.
- One server is drained (SIGTERM) while a bench runs: no stream fails. Streams already on it finish (drain);
  new ones it refuses with UNAVAILABLE before answering are retried by the client's retry policy on the other
  server, and round_robin drops the address once it stops listening.
"""

import json
import re
import signal
import subprocess
import time

import pytest

from server_helpers import CLIENT_BIN, MODEL_DIR, SERVER_BIN, Server, missing


def _requests_total(server):
    import urllib.request
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith("dysco_requests_total{"):
            total += float(line.split()[-1])
    return total


@pytest.fixture()
def two_servers(tmp_path):
    if not SERVER_BIN.exists() or not CLIENT_BIN.exists() or not (MODEL_DIR / "model.pt").exists():
        missing("build/bin/dysco-server, dysco-client or the default model")
    # Two replicas on this machine's cores: one intra-op thread each (the default is every available CPU).
    servers = [Server(tmp_path, f"replica-{i}", ["--drain-timeout", "60", "--threads", "1"]) for i in range(2)]
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def bench(target, *args, timeout=600):
    run = subprocess.run([str(CLIENT_BIN), "bench", "--target", target, "--json", "--no-progress", "--warmup", "0",
                          "--prompt-tokens", "24", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"bench exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    return json.loads(run.stdout)


def test_round_robin_spreads_streams_over_both(two_servers):
    target = "ipv4:" + ",".join(s.target for s in two_servers)
    result = bench(target, "--concurrency", 8, "--requests", 32, "--max-new-tokens", 4)
    phase = result["phases"][-1] if "phases" in result else result
    assert phase["errors"] == 0, phase
    assert phase["requests_completed"] == 32, phase
    counts = [_requests_total(s) for s in two_servers]
    assert all(c > 0 for c in counts), f"a replica got no stream: {counts}"
    assert sum(counts) == 32, counts
    # The startup line reports the threads each replica runs (what --threads asked for).
    assert all(re.search(r"model_loaded .* cpu_threads=1 ", s.log()) for s in two_servers)


def test_draining_one_replica_fails_no_stream(two_servers):
    target = "ipv4:" + ",".join(s.target for s in two_servers)
    victim, survivor = two_servers
    cmd = [str(CLIENT_BIN), "bench", "--target", target, "--json", "--no-progress", "--warmup", "0",
           "--prompt-tokens", "24", "--concurrency", "4", "--requests", "24", "--max-new-tokens", "8"]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Drain the victim once it has served a few streams, while the bench is in full flow.
        give_up = time.monotonic() + 300
        while _requests_total(victim) < 3 and time.monotonic() < give_up and run.poll() is None:
            time.sleep(0.1)
        assert run.poll() is None, "the bench ended before the drain"
        victim.process.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, f"bench exit {run.returncode}\n{out}\n{err}"
    result = json.loads(out)
    phase = result["phases"][-1] if "phases" in result else result
    assert phase["errors"] == 0, f"streams failed across the drain: {phase['errors_by_code']} {phase['first_error']}"
    assert phase["requests_completed"] == 24, phase
    assert victim.process.wait(timeout=120) == 0, victim.log()[-2000:]
    assert "event=drain_done" in victim.log()
    assert _requests_total(survivor) > 0
