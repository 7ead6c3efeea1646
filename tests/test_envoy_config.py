"""deploy/envoy.yaml checked offline: it parses, strictly (an unknown field or a wrong type fails), into
Envoy's v3 Bootstrap with the API's own protos (xds-protos, generated from envoyproxy/data-plane-api), and
it routes as the clients expect: a ring_hash over the replicas keyed on the header they send, gRPC health
checks, HTTP/2 upstream, no limit on a stream's duration. No Envoy runs here (none is packaged for this
machine's system), so what Envoy itself does with it is not tested."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import REPO_ROOT
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (registers the Any type)
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from sinkstream.clients.protocol import SESSION_ID_HEADER

CONFIG = REPO_ROOT / "deploy" / "envoy.yaml"


def parse(document: dict) -> bootstrap_pb2.Bootstrap:
    return json_format.ParseDict(document, bootstrap_pb2.Bootstrap())


@pytest.fixture(scope="module")
def document() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_the_config_parses_strictly_into_envoys_bootstrap(document):
    parse(document)
    broken = copy.deepcopy(document)
    broken["static_resources"]["clusters"][0]["ring_hash_lb_confg"] = {}
    with pytest.raises(json_format.ParseError):
        parse(broken)


def test_calls_are_hashed_on_the_session_header_over_health_checked_http2_replicas(document):
    bootstrap = parse(document)
    (listener,) = bootstrap.static_resources.listeners
    (chain,) = listener.filter_chains
    (network_filter,) = chain.filters
    manager = hcm_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(manager)
    (host,) = manager.route_config.virtual_hosts
    (route,) = host.routes
    (hash_policy,) = route.route.hash_policy
    assert hash_policy.header.header_name == SESSION_ID_HEADER
    assert route.route.timeout.ToSeconds() == 0  # no limit on a stream's duration

    (cluster,) = bootstrap.static_resources.clusters
    assert route.route.cluster == cluster.name
    assert cluster.lb_policy == cluster_pb2.Cluster.RING_HASH
    assert cluster.common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing
    (health_check,) = cluster.health_checks
    assert health_check.HasField("grpc_health_check")
    upstream = http_protocol_options_pb2.HttpProtocolOptions()
    assert cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(upstream)
    assert upstream.explicit_http_config.HasField("http2_protocol_options")
    hosts = [e.endpoint.hostname for group in cluster.load_assignment.endpoints for e in group.lb_endpoints]
    assert hosts == ["sinkstream-0", "sinkstream-1", "sinkstream-2"]
