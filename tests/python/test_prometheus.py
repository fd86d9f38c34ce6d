"""The dashboard and the alerts against a real Prometheus scraping a real dysco-server.

- `promtool check rules` / `promtool test rules` on deploy/prometheus (the alerts' unit tests), `promtool check
  config` on deploy/prometheus/prometheus.yml; every alert has a unit test and a runbook entry in
  docs/operations.md.
- Integration: Debian's `prometheus` on 127.0.0.1 (free port, temporary storage, 1 s scrape and rule
  evaluation, deploy/prometheus/prometheus.yml with its target and intervals replaced) scrapes build/bin/dysco-server
  on free loopback ports while `dysco-client bench` runs plain, DySCO and then mixed load. Then, through the HTTP
  API (/api/v1/query): the dashboard's template variables (label_values(..., model) and label_values(..., instance))
  must list the server, and every panel query of deploy/grafana/dysco-dashboard.json, with $model / $instance set to
  those values and $__rate_interval to a window over the load, must return at least one series, every value
  finite; every recording rule's record and expression and every alert's expression without its threshold
  comparison must return data; Prometheus must report every rule group healthy; `promtool check metrics` must pass
  on the server's exposition. About 55 s measured on a shared 2-core machine under a load average of 9.

Skipped when a binary (server, client, prometheus, promtool) or the model package is missing, unless the CI
environment variable is set (then it fails). DYSCO_SERVER_BIN / DYSCO_CLIENT_BIN / DYSCO_MODEL_DIR override the
default paths.
"""

import json
import math
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from server_helpers import CLIENT_BIN, MODEL_DIR, REPO, SERVER_BIN, load_soak, missing, need
import yaml

PROM_DIR = REPO / "deploy" / "prometheus"
RULES = PROM_DIR / "dysco-rules.yml"
RULE_TESTS = PROM_DIR / "dysco-rules.test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dysco-dashboard.json"
OPERATIONS = REPO / "docs" / "operations.md"
PHASE_CALLS = 4  # Generate calls of each load phase (2 streams at a time): plain, DySCO, then both at once



def _need_tool(name):
    path = shutil.which(name)
    if path is None:
        missing(f"{name} (Debian's prometheus package: scripts/install-deps.sh)")
    return path



soak = load_soak()


def _rules():
    return yaml.safe_load(RULES.read_text())["groups"]


def _alerts():
    return [r for g in _rules() for r in g["rules"] if "alert" in r]


def _records():
    return [r for g in _rules() for r in g["rules"] if "record" in r]


# ---- promtool on the files alone.

def test_promtool_rules_and_config():
    promtool = _need_tool("promtool")
    for args in (["check", "rules", str(RULES)], ["check", "config", str(PROM_CONFIG)],
                 ["test", "rules", str(RULE_TESTS)]):
        run = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=PROM_DIR)
        print(run.stdout + run.stderr)
        assert run.returncode == 0, f"promtool {' '.join(args)}:\n{run.stdout}{run.stderr}"
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    names = [a["alert"] for a in _alerts()]
    assert set(names) <= tested, f"alerts without a firing unit test: {sorted(set(names) - tested)}"
    print(f"promtool test rules: {len(tests)} test groups, {len(names)} alerts each shown firing")


def test_every_dashboard_panel_is_documented():
    docs = OPERATIONS.read_text()
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dashboard["panels"] if p["type"] != "row"]
    missing = [t for t in titles if f"**{t}**" not in docs]
    assert not missing, f"panels missing from docs/operations.md (Dashboard): {missing}"


def test_every_alert_has_a_runbook_entry():
    text = OPERATIONS.read_text()
    headings = {h.strip() for h in re.findall(r"^#+\s+(.*)$", text, re.M)}
    for alert in _alerts():
        assert alert["alert"] in headings, f"docs/operations.md has no runbook heading {alert['alert']!r}"
        anchor = "docs/operations.md#" + alert["alert"].lower()
        assert anchor in alert["annotations"]["description"], alert["alert"]


# ---- Prometheus against the real server.

def _http_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return json.loads(reply.read().decode())


class Prometheus:
    def __init__(self, binary, work, target, model):
        self.port = soak.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load(PROM_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
        config["rule_files"] = [str(RULES)]
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [target], "labels": {"model": model}}]
        path = work / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = work / "prometheus.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=work, preexec_fn=soak._die_with_parent)

    def log_tail(self, n=20):
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout_s=30):
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout_s} s:\n{self.log_tail()}")

    def api(self, path, **params):
        query = urllib.parse.urlencode(params, doseq=True)
        reply = _http_json(f"{self.base}/api/v1/{path}?{query}")
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr):
        return self.api("query", query=expr)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


def _bench(target, dysco, seed, requests):
    args = [str(CLIENT_BIN), "bench", "--target", target, "--concurrency", "2", "--prompt-tokens", "48",
            "--max-new-tokens", "12", "--warmup", "0", "--seed", str(seed), "--temperature", "0.8", "--json",
            "--no-progress", "--requests", str(requests)]
    if dysco:
        args.append("--dysco")
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _bench_result(process, what):
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, f"dysco-client bench ({what}) exit {process.returncode}:\n{err[-3000:]}"
    result = json.loads(out)
    completed = sum(phase["requests_completed"] for phase in result["phases"])
    errors = sum(phase["errors"] for phase in result["phases"])
    assert completed > 0 and errors == 0, f"dysco-client bench ({what}): {completed} completed, {errors} errors"
    return {"completed": completed, "generated_tokens": sum(p["generated_tokens"] for p in result["phases"])}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The server under plain, DySCO and mixed load, scraped by Prometheus; yields a namespace."""
    prometheus_bin = _need_tool("prometheus")
    _need_tool("promtool")
    need(SERVER_BIN, CLIENT_BIN, MODEL_DIR / "model.pt")
    grpc = pytest.importorskip("grpc")
    work = tmp_path_factory.mktemp("prometheus")
    start = time.monotonic()
    pb = soak.load_stubs(work / "stubs")
    server = soak.ServerProcess(SERVER_BIN, MODEL_DIR, work / "dysco-server.log",
                                ["--kv-pages", 256, "--max-batch", 8, "--max-context", 1024, "--threads", 2])
    prom = None
    try:
        prom = Prometheus(prometheus_bin, work, f"127.0.0.1:{server.metrics_port}", MODEL_DIR.name)
        server.wait_ready(pb, grpc)
        prom.wait_ready()
        # Warm-up (TorchScript's profiling runs make the first steps slow): plain and DySCO calls, kept out of the
        # panels' rate window below.
        for dysco in (False, True):
            _bench_result(_bench(server.target, dysco, 0, 2), "warm-up")
        time.sleep(2)
        load_start = time.monotonic()
        results = {}
        # A number of calls per phase, not a duration: on a loaded machine every phase still completes some.
        phase_start = time.monotonic()
        results["plain"] = _bench_result(_bench(server.target, False, 1, PHASE_CALLS), "plain")
        results["dysco"] = _bench_result(_bench(server.target, True, 2, PHASE_CALLS), "dysco")
        mixed = [_bench(server.target, False, 3, PHASE_CALLS),
                 _bench(server.target, True, 4, PHASE_CALLS)]
        results["mixed plain"] = _bench_result(mixed[0], "mixed plain")
        results["mixed dysco"] = _bench_result(mixed[1], "mixed dysco")
        # One malformed request (top_p > 1): refused with INVALID_ARGUMENT, so dysco_requests_refused_total has a
        # series too (a code's series appears at its first refusal).
        channel = grpc.insecure_channel(server.target)
        try:
            request = pb.gen.GenerateRequest(prompt="Hello", max_new_tokens=4)
            request.sampling.top_p = 1.5
            with pytest.raises(grpc.RpcError) as refused:
                list(pb.gen_grpc.GenerationStub(channel).Generate(request, timeout=60))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        finally:
            channel.close()
        results["load_s"] = round(time.monotonic() - phase_start, 1)
        time.sleep(3)  # the last scrapes and rule evaluations after the load
        load_s = time.monotonic() - load_start
        print(f"load: {json.dumps(results)}")

        class Loaded:
            pass

        ns = Loaded()
        ns.server, ns.prom, ns.pb, ns.grpc = server, prom, pb, grpc
        ns.model = MODEL_DIR.name
        ns.instance = f"127.0.0.1:{server.metrics_port}"
        # A window over the whole load for the panels' $__rate_interval (Grafana: at least 4 scrape intervals).
        ns.window = f"{math.ceil(load_s)}s"
        ns.setup_s = time.monotonic() - start
        print(f"server + prometheus + load: {ns.setup_s:.1f} s, rate window {ns.window}")
        yield ns
    finally:
        if prom is not None:
            prom.stop()
        code = server.stop()
        assert code == 0, f"dysco-server exit {code} after SIGTERM:\n{server.log_tail()}"


def _values(result):
    data_type = result["resultType"]
    if data_type == "vector":
        return [float(s["value"][1]) for s in result["result"]]
    if data_type == "scalar":
        return [float(result["result"][1])]
    raise AssertionError(f"unexpected result type {data_type}")


def _require_data(prom, expr, what, all_finite=True):
    result = prom.query(expr)
    values = _values(result)
    assert values, f"{what}: no data for\n  {expr}"
    finite = [v for v in values if math.isfinite(v)]
    if all_finite:
        assert len(finite) == len(values), f"{what}: non-finite values {result['result']} for\n  {expr}"
    else:
        assert finite, f"{what}: no finite value in {result['result']} for\n  {expr}"
    return result["result"]


def _label_values(prom, definition):
    """Grafana's label_values(metric{selector}, label) through /api/v1/label/<label>/values?match[]=..."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition.strip())
    assert m, f"not a label_values(metric, label) query: {definition}"
    return prom.api(f"label/{m.group(2)}/values", **{"match[]": m.group(1)})


def _regex_value(value):
    """A single selected value as Grafana interpolates it into =~ (regex-escaped)."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\\\1", value)


def _substitute(expr, variables):
    def one(m):
        name = m.group(1) or m.group(2)
        assert name in variables, f"unknown dashboard variable ${name} in {expr}"
        return variables[name]
    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)
    assert "$" not in out, out
    return out


def test_template_variables_list_the_server(loaded):
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "model", "instance"} <= set(variables)
    models = _label_values(loaded.prom, variables["model"]["definition"])
    assert loaded.model in models, models
    instance_query = _substitute(variables["instance"]["definition"], {"model": _regex_value(loaded.model)})
    instances = _label_values(loaded.prom, instance_query)
    assert instances == [loaded.instance], instances
    # The query's own form (what Grafana stores) agrees with the definition.
    for name in ("model", "instance"):
        assert variables[name]["query"]["query"] == variables[name]["definition"]


def _panel_targets():
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for panel_or_child in [panel, *panel.get("panels", [])]:
            for target in panel_or_child.get("targets", []):
                out.append((f"panel {panel_or_child['id']} {panel_or_child['title']!r} {target['refId']}",
                            target["expr"]))
    return out


def test_every_dashboard_query_returns_data(loaded):
    targets = _panel_targets()
    assert len(targets) >= 20
    selected = {"model": _regex_value(loaded.model), "instance": _regex_value(loaded.instance)}
    all_values = {"model": ".*", "instance": ".*"}  # the variables' "All"
    for variables in (selected, all_values):
        for what, expr in targets:
            filled = _substitute(expr, {**variables, "__rate_interval": loaded.window,
                                        "__interval": loaded.window, "__range": loaded.window})
            _require_data(loaded.prom, filled, what)
    print(f"dashboard: {len(targets)} panel queries returned data, with the selected values and with All")


def test_dysco_overhead_ratio_panel(loaded):
    (panel,) = [p for p in json.loads(DASHBOARD.read_text())["panels"] if "overhead ratio" in p["title"]]
    for target in panel["targets"]:
        expr = _substitute(target["expr"], {"model": ".*", "instance": ".*", "__rate_interval": loaded.window})
        (series,) = _require_data(loaded.prom, expr, panel["title"])
        ratio = float(series["value"][1])
        print(f"{target['legendFormat']}: {ratio:.3f}")
        assert 0.1 < ratio < 100, ratio  # a DySCO step and a plain step of the same model, not garbage


def test_a_broken_query_fails(loaded):
    # What the checks above would say about a typo in a metric name, a label value that matches nothing, or an
    # unknown dashboard variable: each is a failure, not a pass.
    what, expr = _panel_targets()[1]
    variables = {"model": ".*", "instance": ".*", "__rate_interval": loaded.window}
    with pytest.raises(AssertionError, match="no data"):
        _require_data(loaded.prom, _substitute(expr.replace("dysco_", "dysko_"), variables), what)
    with pytest.raises(AssertionError, match="no data"):
        _require_data(loaded.prom, _substitute(expr, {**variables, "model": "no-such-model"}), what)
    with pytest.raises(AssertionError, match="unknown dashboard variable"):
        _substitute(expr + " + $node", variables)


def _split_threshold(expr):
    """An alert expression -> its operands without the threshold comparisons: `a > 8 and b > 0` -> [a, b]."""
    parts = re.split(r"\s+(?:and|or|unless)\s+", " ".join(expr.split()))
    out = []
    for part in parts:
        m = re.fullmatch(r"(.+?)\s*(?:>|<|>=|<=|==|!=)\s*(-?[0-9.eE+-]+)", part)
        assert m, f"cannot find the threshold comparison in {part!r} (of {expr!r})"
        out.append(m.group(1))
    return out


def test_every_alert_and_record_returns_data(loaded):
    prom = loaded.prom
    groups = prom.api("rules")["groups"]
    by_name = {}
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok", rule
            by_name[rule["name"]] = rule
    records, alerts = _records(), _alerts()
    assert {r["record"] for r in records} | {a["alert"] for a in alerts} == set(by_name)
    evaluated = 0
    for record in records:
        _require_data(prom, record["record"], f"record {record['record']}")
        _require_data(prom, record["expr"], f"record {record['record']} expression")
        evaluated += 2
    for alert in alerts:
        for operand in _split_threshold(alert["expr"]):
            _require_data(prom, operand, f"alert {alert['alert']}")
            evaluated += 1
        assert by_name[alert["alert"]]["state"] != "firing", by_name[alert["alert"]]  # a healthy server
    print(f"rules: {len(records)} records and {len(alerts)} alerts, {evaluated} expressions returned data")


def test_promtool_check_metrics_on_the_exposition(loaded):
    with urllib.request.urlopen(f"http://127.0.0.1:{loaded.server.metrics_port}/metrics", timeout=10) as reply:
        body = reply.read()
    run = subprocess.run([shutil.which("promtool"), "check", "metrics"], input=body, capture_output=True,
                         timeout=60)
    out = (run.stdout + run.stderr).decode(errors="replace")
    print(out)
    assert run.returncode == 0, out
    assert b"dysco_step_seconds_bucket" in body
    # Every metric family the server exports is documented in docs/operations.md.
    families = re.findall(r"^# TYPE (\S+) ", body.decode(), re.M)
    assert len(families) >= 14, families  # server/metrics.h: 14 families today
    docs = OPERATIONS.read_text()
    undocumented = [f for f in families if f"`{f}" not in docs]
    assert not undocumented, f"metrics missing from docs/operations.md: {undocumented}"
    print(f"promtool check metrics: {len(families)} metric families pass, each documented")


def test_threshold_split_fails_on_a_bare_expression():
    # The alert check depends on finding the comparison; an alert without one is not a valid alert here.
    with pytest.raises(AssertionError):
        _split_threshold("dysco_requests_waiting")
    assert _split_threshold('dysco_requests_waiting > 8 and deriv(dysco_requests_waiting[10m]) > 0') == [
        "dysco_requests_waiting", "deriv(dysco_requests_waiting[10m])"]
    assert _split_threshold('up{job="dysco-server"} == 0') == ['up{job="dysco-server"}']
