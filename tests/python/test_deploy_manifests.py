"""The Kubernetes manifests of deploy/kubernetes, rendered and validated offline.

Every overlay (deploy/kubernetes/overlays/*) is rendered with `kubectl kustomize` and every object validated with
PyPI's kubernetes-validate in strict mode (unknown fields rejected) against the Kubernetes versions in
K8S_VERSIONS (1.30, the oldest supported here, and 1.33). The Prometheus Operator's custom resources (PodMonitor,
PrometheusRule) have no schema offline: their schema validation is named as skipped in the output, and they are
checked instead against what they refer to (the PrometheusRule's groups are deploy/prometheus/dysco-rules.yml and
pass `promtool check rules`; the PodMonitor's port, selector, job label and model relabeling match the pods).
Then the wiring the schemas cannot see: selectors and ports of the Services, the headless Service, the HPA's target
and custom metric (the Prometheus adapter rule), the PDB, the NetworkPolicy ports, the probes on grpc.health.v1,
the grace period above preStop + drain_timeout, the TLS / token Secrets mounted at /etc/dysco/tls and
/etc/dysco/auth and passed as --tls-cert / --tls-key / --tls-client-ca / --auth-token-file, the config keys, and
the GPU overlay's nvidia.com/gpu, node selector and tolerations.

Skipped when kubectl or kubernetes-validate is missing, unless the CI environment variable is set (then it fails).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
K8S_VERSIONS = ["1.30.0", "1.33.0"]
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
EXPECTED_KINDS = {"ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                  "NetworkPolicy", "PodMonitor", "PrometheusRule"}


def _missing(what):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing (CI is set, so this is a failure, not a skip)")
    pytest.skip(f"{what} is missing")


def _validator():
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate (tools/requirements.txt; scripts/setup-python.sh installs it)")
    return kubernetes_validate


def _render(overlay):
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if kubectl:
        cmd = [kubectl, "kustomize", str(K8S / "overlays" / overlay)]
    elif kustomize:
        cmd = [kustomize, "build", str(K8S / "overlays" / overlay)]
    else:
        _missing("kubectl (or kustomize)")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"{' '.join(cmd)}:\n{run.stderr}"
    objects = [o for o in yaml.safe_load_all(run.stdout) if o]
    assert objects, f"{overlay}: rendered nothing"
    return objects


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, _render(request.param)


def _one(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"want one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def test_overlays_exist():
    assert OVERLAYS == ["cpu", "gpu"]


def test_every_object_validates_strictly(rendered):
    kv = _validator()
    overlay, objects = rendered
    assert EXPECTED_KINDS <= {o["kind"] for o in objects}
    for version in K8S_VERSIONS:
        validated, skipped = 0, []
        for obj in objects:
            if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
                skipped.append(f"{obj['kind']}/{obj['metadata']['name']}")
                continue
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: "
                            f"{'.'.join(map(str, e.path))}: {e.message}")
            except kv.SchemaNotFoundError as e:
                pytest.fail(f"{overlay}: {e.message}")
            validated += 1
        print(f"overlay {overlay}: {validated} objects valid (kubernetes-validate --strict, Kubernetes {version}); "
              f"schema validation skipped (no offline schema): {', '.join(skipped)}")
        assert validated == len(objects) - len(CUSTOM_KINDS)


def test_strict_validation_rejects_an_unknown_field():
    kv = _validator()
    _, objects = "cpu", _render("cpu")
    bad = yaml.safe_load(yaml.safe_dump(_one(objects, "Deployment")))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}  # a typo of livenessProbe
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[0], strict=True)
    bad = yaml.safe_load(yaml.safe_dump(_one(objects, "HorizontalPodAutoscaler")))
    bad["spec"]["metrics"][0]["pods"]["target"]["type"] = 7
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[0], strict=True)


def _pod(objects):
    return _one(objects, "Deployment", "dysco-server")["spec"]["template"]


def _container(objects):
    (c,) = [c for c in _pod(objects)["spec"]["containers"] if c["name"] == "dysco-server"]
    return c


def _flags(container):
    out = {}
    args = container.get("args", [])
    i = 0
    while i < len(args):
        arg = args[i]
        assert arg.startswith("--"), f"unexpected argument {arg!r}"
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
        else:
            name, value = arg[2:], args[i + 1]
            i += 1
        out[name] = value
        i += 1
    return out


def _config(objects):
    cm = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("dysco-server-config")]
    assert len(cm) == 1
    return cm[0], yaml.safe_load(cm[0]["data"]["dysco-server.yaml"])


def _mounts(objects, container):
    """mountPath -> the pod volume."""
    volumes = {v["name"]: v for v in _pod(objects)["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}


def _secret_file(objects, container, path):
    """The Secret key a file path in the container comes from."""
    mounts = _mounts(objects, container)
    directory, key = path.rsplit("/", 1)
    assert directory in mounts, f"{path}: {directory} is not a mount"
    volume = mounts[directory]
    assert "secret" in volume, f"{path}: {directory} is not a Secret volume"
    secret = _one(objects, "Secret", volume["secret"]["secretName"])
    data = {**secret.get("data", {}), **secret.get("stringData", {})}
    assert key in data, f"{path}: Secret {secret['metadata']['name']} has no key {key}"
    return secret["metadata"]["name"], key


def test_tls_and_token_secrets_are_mounted_and_passed(rendered):
    overlay, objects = rendered
    container = _container(objects)
    flags = _flags(container)
    want = {"tls-cert": "/etc/dysco/tls/tls.crt", "tls-key": "/etc/dysco/tls/tls.key",
            "tls-client-ca": "/etc/dysco/tls/ca.crt", "auth-token-file": "/etc/dysco/auth/tokens"}
    for flag, path in want.items():
        assert flags.get(flag) == path, f"{overlay}: --{flag}={flags.get(flag)}"
        _secret_file(objects, container, path)
    mounts = _mounts(objects, container)
    assert mounts["/etc/dysco/tls"]["secret"]["secretName"] != mounts["/etc/dysco/auth"]["secret"]["secretName"]
    # Placeholders, never real key material, in the repository.
    for secret in (o for o in objects if o["kind"] == "Secret"):
        for key, value in {**secret.get("data", {}), **secret.get("stringData", {})}.items():
            assert "REPLACE-ME" in value, f"{secret['metadata']['name']}/{key}: not a placeholder"


def test_config_probes_and_termination(rendered):
    overlay, objects = rendered
    container = _container(objects)
    flags = _flags(container)
    cm, config = _config(objects)
    # The config file: mounted where --config points, its keys those of the documented deploy/dysco-server.yaml.
    config_path = flags["config"]
    directory, filename = config_path.rsplit("/", 1)
    volume = _mounts(objects, container)[directory]
    assert volume["configMap"]["name"] == cm["metadata"]["name"] and filename in cm["data"]
    documented = yaml.safe_load((REPO / "deploy" / "dysco-server.yaml").read_text())
    flag_keys = {k.replace("-", "_") for k in flags} - {"config", "tls_cert", "tls_key", "tls_client_ca",
                                                        "auth_token_file"}
    assert set(config) | flag_keys <= set(documented), set(config) | flag_keys - set(documented)
    # The model lives on the model volume.
    mounts = _mounts(objects, container)
    (model_mount,) = [p for p in mounts if config["model"].startswith(p + "/")]
    assert {"emptyDir", "persistentVolumeClaim"} & set(mounts[model_mount]), mounts[model_mount]
    # Probes: grpc.health.v1 through the client (TLS), readiness/startup on dysco.v1.Generation, liveness on "".
    grpc_port = {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"]
    assert config["port"] == grpc_port and config["metrics_port"] == {p["name"]: p["containerPort"]
                                                                      for p in container["ports"]}["metrics"]
    for probe, service in (("startupProbe", "dysco.v1.Generation"), ("readinessProbe", "dysco.v1.Generation"),
                           ("livenessProbe", None)):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["/opt/dysco/bin/dysco-client", "health"], command
        assert command[command.index("--target") + 1] == f"localhost:{grpc_port}"
        assert ("--service" in command) == (service is not None)
        if service:
            assert command[command.index("--service") + 1] == service
        for flag, path in (("--tls-ca", "/etc/dysco/tls/ca.crt"), ("--tls-cert", "/etc/dysco/tls/tls.crt"),
                           ("--tls-key", "/etc/dysco/tls/tls.key")):
            assert command[command.index(flag) + 1] == path, (probe, flag)
    # Termination: the grace period covers the preStop sleep and the drain.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = _pod(objects)["spec"]["terminationGracePeriodSeconds"]
    drain = float(flags.get("drain-timeout", config["drain_timeout"]))
    assert grace > float(pre_stop[1]) + drain, f"{overlay}: grace {grace} <= preStop {pre_stop[1]} + drain {drain}"


def test_services_hpa_pdb_networkpolicy(rendered):
    overlay, objects = rendered
    pod_labels = _pod(objects)["metadata"]["labels"]
    container = _container(objects)
    ports = {p["name"] for p in container["ports"]}
    services = [o for o in objects if o["kind"] == "Service"]
    assert len(services) == 2
    for svc in services:
        assert svc["spec"]["selector"].items() <= pod_labels.items(), svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, port
    (headless,) = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    deployment = _one(objects, "Deployment", "dysco-server")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    hpa = _one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "dysco-server"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "dysco_requests_waiting"
    adapter = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus-adapter-rules.yaml").read_text())
    served = [r["name"]["as"] for r in adapter["rules"]]
    assert metric["pods"]["metric"]["name"] in served, served
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]

    pdb = _one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    netpol = _one(objects, "NetworkPolicy")
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    allowed = {p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {"grpc", "metrics"}, allowed


def test_prometheus_operator_objects(rendered):
    overlay, objects = rendered
    pod_labels = _pod(objects)["metadata"]["labels"]
    container = _container(objects)
    monitor = _one(objects, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container["ports"]} and endpoint["port"] == "metrics"
    # job="dysco-server" as the alerts select, the model label from the pod label.
    assert pod_labels[monitor["spec"]["jobLabel"]] == "dysco-server"
    (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "model"]
    (source,) = relabel["sourceLabels"]
    model_labels = [k for k in pod_labels if "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k) == source]
    assert model_labels, f"{source} matches no pod label of {sorted(pod_labels)}"

    rule = _one(objects, "PrometheusRule")
    groups = yaml.safe_load((REPO / "deploy" / "prometheus" / "dysco-rules.yml").read_text())["groups"]
    assert rule["spec"]["groups"] == groups, (
        "deploy/kubernetes/base/prometheusrule.yaml differs from deploy/prometheus/dysco-rules.yml: "
        "run deploy/prometheus/make-prometheusrule.py")
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert any('up{job="dysco-server"}' in a["expr"] for a in alerts)
    promtool = shutil.which("promtool")
    if promtool is None:
        print("PrometheusRule: promtool check rules skipped (no promtool)")
        return
    run = subprocess.run([promtool, "check", "rules", "/dev/stdin"], input=yaml.safe_dump({"groups": rule["spec"]["groups"]}),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    print(f"overlay {overlay}: PrometheusRule spec passes promtool check rules")


def test_gpu_overlay_asks_for_a_gpu():
    objects = _render("gpu")
    pod = _pod(objects)["spec"]
    container = _container(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert _flags(container)["device"].startswith("cuda")
    assert container["image"].endswith(":cuda")
    # The model init container comes from the same image (it copies the package baked into it).
    assert {c["image"] for c in pod.get("initContainers", []) + pod["containers"]} == {container["image"]}
    cpu = _render("cpu")
    assert "nvidia.com/gpu" not in str(_container(cpu)["resources"]) and "nodeSelector" not in _pod(cpu)["spec"]
    assert _flags(_container(cpu))["device"] == "cpu" and _container(cpu)["image"].endswith(":cpu")
    # Intra-op threads match the CPU request.
    assert _flags(_container(cpu))["threads"] == _container(cpu)["resources"]["requests"]["cpu"]
