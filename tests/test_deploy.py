"""The container and orchestrator examples: valid YAML whose commands the real services accept,
with ports, shards and addresses that fit together, secure by default: mutual TLS between services,
a token at the gateway, only the gateway reaching encoder and index, liveness on the process and
readiness on health (which for the gateway follows its downstream services)."""

import importlib
import re
from pathlib import Path

import pytest
import yaml

from services.common import wait_ready
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
SERVERS = {"services.index.server", "services.encoder.server", "services.gateway.server"}


def parse_command(command: list[str]):
    """["python", "-m", module, *flags] -> (module, the flags as that service's own parser reads them)."""
    assert all(isinstance(part, str) for part in command), f"non-string argument in {command}"
    assert command[:2] == ["python", "-m"] and command[2] in SERVERS, command
    return command[2], importlib.import_module(command[2]).build_parser().parse_args(command[3:])


def assert_secure(module: str, args) -> None:
    """Backends: TLS with a client CA (mutual TLS). Gateway: TLS, a client certificate downstream, a token."""
    assert args.tls_cert and args.tls_key, module
    if module == "services.gateway.server":
        assert args.downstream_tls_ca and args.downstream_tls_cert and args.downstream_tls_key and args.token_file
    else:
        assert args.tls_client_ca, module
    assert args.reflection  # reflection stays on, behind the token at the gateway and mutual TLS elsewhere


def parse_probe(command: list[str], port: int):
    """A readiness probe: wait_ready on this container's own port, over mutual TLS."""
    assert command[:3] == ["python", "-m", "services.common.wait_ready"], command
    args = wait_ready.build_parser().parse_args(command[3:])
    (service,) = args.services
    assert service.split("=", 1)[1] == f"127.0.0.1:{port}" and args.tls_ca
    return args


def test_compose_file_fits_together():
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    parsed = {name: parse_command(service["command"]) for name, service in services.items()}
    assert all(args.host == "0.0.0.0" for _, args in parsed.values())
    shards = {args.shard: name for name, (module, args) in parsed.items() if module.endswith("index.server") and args.shard is not None}
    assert sorted(shards) == [0, 1, 2]
    _, gateway = parsed["gateway"]
    assert gateway.image_shard == [f"{shards[i]}:{parsed[shards[i]][1].port}" for i in range(3)]
    words_host, words_port = gateway.index.split(":")
    assert parsed[words_host][1].indexes == "words" and int(words_port) == parsed[words_host][1].port
    assert gateway.encoder == f"dns:///encoder:{parsed['encoder'][1].port}"
    for name, (module, args) in parsed.items():
        assert_secure(module, args)
        if module != "services.gateway.server":
            assert any(volume.endswith(f":{args.artifacts}:ro") for volume in services[name]["volumes"])
            assert services[name]["networks"] == ["backend"] and "ports" not in services[name]
        if name in shards.values():  # image shards write the live-update log
            assert f"../artifacts/live:{args.artifacts}/live" in services[name]["volumes"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["networks"]["backend"]["internal"] is True  # only the gateway is reachable from outside
    assert services["gateway"]["ports"] == [f"{gateway.port}:{gateway.port}"]
    parse_probe(services["gateway"]["healthcheck"]["test"][1:], gateway.port)


def test_kubernetes_manifests_fit_together():
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "semsearch.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    deployments = {name: d for (kind, name), d in kinds.items() if kind == "Deployment"}
    assert len(deployments) == 6
    ports = {}
    for name, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        module, args = parse_command(container["command"] + container["args"])
        ports[name] = args.port
        assert_secure(module, args)
        assert container["ports"][0]["containerPort"] == args.port == container["livenessProbe"]["tcpSocket"]["port"]
        probe = parse_probe(container["readinessProbe"]["exec"]["command"], args.port)
        assert probe.tls_cert and probe.tls_server_name == f"{name}.semsearch.svc.cluster.local"
        mounted = {m["mountPath"] for m in container["volumeMounts"]}
        assert {str(Path(f).parent) for f in (args.tls_cert, args.tls_key, probe.tls_ca)} <= mounted
        service = kinds[("Service", name)]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert service["spec"]["ports"][0]["targetPort"] == args.port
        for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in kinds
            else:  # TLS files and tokens come from Secrets made outside the example (see its header)
                assert volume["secret"]["secretName"] in ("semsearch-tls", "semsearch-gateway-token")
        if module == "services.index.server" and args.shard is not None:
            assert name == f"index-shard-{args.shard}" and args.indexes == "images"
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert not mounts[f"{args.artifacts}/live"].get("readOnly") and mounts[args.artifacts]["readOnly"]
    (gateway,) = deployments["gateway"]["spec"]["template"]["spec"]["containers"]
    _, args = parse_command(gateway["command"] + gateway["args"])
    targets = [re.fullmatch(r"dns:///([\w-]+)\.semsearch\.svc\.cluster\.local:(\d+)", t) for t in
               [args.encoder, args.index, *args.image_shard]]
    assert all(targets) and [t[1] for t in targets] == ["encoder", "index-words", "index-shard-0", "index-shard-1", "index-shard-2"]
    assert all(int(t[2]) == ports[t[1]] for t in targets)
    assert kinds[("Service", "gateway")]["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_kubernetes_network_policy_lets_only_the_gateway_reach_encoder_and_index():
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "semsearch.yaml").read_text()))
    policies = [d for d in documents if d["kind"] == "NetworkPolicy"]
    apps = {d["metadata"]["name"] for d in documents if d["kind"] == "Deployment"}
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress")
               for p in policies), "a default deny of all ingress"

    def selects(policy, app: str) -> bool:
        selector = policy["spec"]["podSelector"]
        if selector == {}:
            return True
        if selector.get("matchLabels", {}).get("app") == app:
            return True
        return any(e["key"] == "app" and e["operator"] == "In" and app in e["values"]
                   for e in selector.get("matchExpressions", []))

    for app in apps - {"gateway"}:
        rules = [rule for p in policies if selects(p, app) for rule in p["spec"].get("ingress", [])]
        assert rules and all(rule["from"] == [{"podSelector": {"matchLabels": {"app": "gateway"}}}] for rule in rules), app


@pytest.mark.parametrize("line", [l for l in (DEPLOY / "Dockerfile").read_text().splitlines() if l.startswith("COPY ")])
def test_dockerfile_copies_what_exists(line):
    *sources, _ = line.split()[1:]
    assert all((REPO / source).exists() for source in sources), line
