"""deploy/k8s/ checked offline: every manifest against the Kubernetes API schemas that kubernetes-validate
ships (strict: an unknown or misspelt field fails), and the manifests against the code they run: the
container's arguments are options `sinkstream serve` accepts, the probes and ports name the ports those
arguments open, the HPA's metric is one the server exports, the proxy's replica addresses are the
StatefulSet's pods."""

from __future__ import annotations

import copy
import re

import kubernetes_validate
import pytest
import yaml
from conftest import REPO_ROOT

from sinkstream.clients.cli.serve import build_parser
from sinkstream.service.metrics import ServerMetrics

K8S = REPO_ROOT / "deploy" / "k8s"
HAPROXY_CFG = REPO_ROOT / "deploy" / "haproxy.cfg"
# The oldest Kubernetes the manifests are written for (native gRPC probes: 1.27; preStop `sleep`: 1.30,
# on by default) and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
# Options of `sinkstream serve` that the security work (issue 15) adds; until it is merged the parser here
# does not know them, and each is checked by its use in the manifests (probes, mounts) only.
OPTIONS_FROM_ISSUE_15 = {"--health-port", "--auth-tokens"}


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def resource(kind: str, name: str) -> dict:
    found = [doc for _, doc in documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def replica_container() -> dict:
    (container,) = resource("StatefulSet", "sinkstream")["spec"]["template"]["spec"]["containers"]
    return container


def serve_options(args: list[str]) -> dict[str, str]:
    """The `serve` arguments as option -> value, after checking that `sinkstream serve` accepts them."""
    assert args[0] == "serve"
    options = dict(zip(args[1::2], args[2::2], strict=True))
    _, unknown = build_parser().parse_known_args(args[1:])  # exits (SystemExit) on a bad value
    assert set(unknown[::2]) <= OPTIONS_FROM_ISSUE_15, f"options `sinkstream serve` does not have: {unknown}"
    return options


def ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_there_are_manifests_of_every_kind_the_deployment_needs():
    kinds = sorted(doc["kind"] for _, doc in documents())
    assert kinds == sorted(["Service", "StatefulSet", "PodDisruptionBudget", "Deployment", "Service",
                            "HorizontalPodAutoscaler", "Service", "StatefulSet"])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schema(version):
    for name, doc in documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_the_validation_refuses_a_misspelt_field():
    """The check above can fail: strict validation rejects a field the API does not have."""
    broken = copy.deepcopy(resource("StatefulSet", "sinkstream"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50052}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_probes_and_ports_are_the_ones_the_server_arguments_open():
    container = replica_container()
    options = serve_options(container["args"])
    named = ports(container)
    assert options["--host"] == "0.0.0.0" and options["--metrics-host"] == "0.0.0.0"
    assert named == {"grpc": int(options["--port"]), "health": int(options["--health-port"]),
                     "metrics": int(options["--metrics-port"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": named["health"]}, probe
    annotations = resource("StatefulSet", "sinkstream")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == named["metrics"]
    (service_port,) = resource("Service", "sinkstream-replicas")["spec"]["ports"]
    assert service_port["targetPort"] == "grpc"


def test_the_state_store_is_the_redis_service_with_every_write_fsynced():
    """The replicas share the Redis of redis.yaml (by its Service's name and port), whose append-only file
    is fsync'd before each answer and on a persistent volume; each replica advertises its pod's name."""
    options = serve_options(replica_container()["args"])
    assert "--state-dir" not in options
    service = resource("Service", "sinkstream-redis")
    (port,) = service["spec"]["ports"]
    assert options["--state-store"] == f"redis://{service['metadata']['name']}:{port['port']}/0"
    redis = resource("StatefulSet", "sinkstream-redis")
    assert redis["spec"]["template"]["metadata"]["labels"] == service["spec"]["selector"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    settings = dict(zip(container["args"][::2], container["args"][1::2], strict=True))
    assert settings["--appendonly"] == "yes" and settings["--appendfsync"] == "always"
    assert settings["--maxmemory-policy"] == "noeviction"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == settings["--dir"]
    statefulset = resource("StatefulSet", "sinkstream")
    headless = statefulset["spec"]["serviceName"]
    port = ports(replica_container())["grpc"]
    pod_address = f"$(POD_NAME).{headless}.$(POD_NAMESPACE).svc.cluster.local:{port}"
    assert options["--advertise-address"] == pod_address
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in replica_container()["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}


def test_model_and_tokens_are_mounted_where_the_arguments_point():
    statefulset = resource("StatefulSet", "sinkstream")
    container = replica_container()
    options = serve_options(container["args"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert options["--model"].startswith(mounts["models"] + "/")
    assert options["--auth-tokens"].startswith(mounts["tokens"] + "/")
    volumes = {v["name"] for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert {"models", "tokens"} <= volumes


def test_termination_grace_covers_the_pre_stop_wait_the_stream_grace_and_persisting():
    spec = resource("StatefulSet", "sinkstream")["spec"]["template"]["spec"]
    container = replica_container()
    grace = float(serve_options(container["args"])["--grace"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    persisting = 60  # seconds left for writing every session's snapshot
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + grace + persisting


def test_the_autoscaler_scales_the_replicas_on_a_metric_the_server_exports():
    hpa = resource("HorizontalPodAutoscaler", "sinkstream")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", "sinkstream")
    exported = {metric.name for metric in ServerMetrics().registry.collect()}
    for metric in hpa["spec"]["metrics"]:
        assert metric["pods"]["metric"]["name"] in exported
    servers = re.findall(r"^\s*server replica-(\d+) ", HAPROXY_CFG.read_text(), re.MULTILINE)
    assert hpa["spec"]["maxReplicas"] <= len(servers)


def test_the_proxy_names_each_pod_of_the_statefulset_in_the_server_lines_order():
    statefulset = resource("StatefulSet", "sinkstream")
    headless = statefulset["spec"]["serviceName"]
    assert resource("Service", headless)["spec"]["clusterIP"] == "None"
    (proxy,) = resource("Deployment", "sinkstream-proxy")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    servers = re.findall(r'^\s*server replica-(\d+) "\$\{(SINKSTREAM_REPLICA_\d+)-', HAPROXY_CFG.read_text(),
                         re.MULTILINE)
    assert len(servers) >= statefulset["spec"]["replicas"]
    for number, variable in servers:
        pod = f"sinkstream-{int(number) - 1}"
        port = ports(replica_container())["grpc"]
        assert env[variable] == f"{pod}.{headless}.$(POD_NAMESPACE).svc.cluster.local:{port}"
    (client_port,) = resource("Service", "sinkstream")["spec"]["ports"]
    assert ports(proxy)[client_port["targetPort"]] == int(env["SINKSTREAM_PROXY_BIND"].rsplit(":", 1)[1])
    config_volume = resource("Deployment", "sinkstream-proxy")["spec"]["template"]["spec"]["volumes"][0]
    assert config_volume["configMap"]["name"] == "sinkstream-haproxy"
    (mount,) = proxy["volumeMounts"]
    assert mount["name"] == config_volume["name"] and proxy["args"][-1] == mount["mountPath"] + "/haproxy.cfg"
