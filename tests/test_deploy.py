"""The container and orchestrator examples: valid YAML whose commands the real services accept,
with ports, shards and addresses that fit together, secure by default: mutual TLS between services,
a token at the gateway, only the gateway reaching encoder and index, liveness on the process and
readiness on health (which for the gateway follows its downstream services); the web service as the
public entry, over HTTPS, reaching only the gateway, over TLS, with no token of its own."""

import importlib
import re
from pathlib import Path

import pytest
import yaml

from services.common import metrics, wait_ready
from services.web.metrics import WebMetrics
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
SERVERS = {"services.index.server", "services.encoder.server", "services.gateway.server", "services.web.server"}
CLIENTS = {"services.gateway.server", "services.web.server"}  # no artifact of their own


def parse_command(command: list[str]):
    """["python", "-m", module, *flags] -> (module, the flags as that service's own parser reads them)."""
    assert all(isinstance(part, str) for part in command), f"non-string argument in {command}"
    assert command[:2] == ["python", "-m"] and command[2] in SERVERS, command
    return command[2], importlib.import_module(command[2]).build_parser().parse_args(command[3:])


def assert_secure(module: str, args) -> None:
    """Backends: TLS with a client CA (mutual TLS). Gateway: TLS, a client certificate downstream, a token.
    Web (an HTTP server): HTTPS, the gateway's certificate checked against the CA, and no token of its
    own (each HTTP caller's is passed on)."""
    assert args.tls_cert and args.tls_key, module
    if module == "services.web.server":
        assert args.gateway_tls_ca, module
        assert not getattr(args, "token_file", None) and not getattr(args, "token", None), module
        return
    if module == "services.gateway.server":
        assert args.downstream_tls_ca and args.downstream_tls_cert and args.downstream_tls_key and args.token_file
    else:
        assert args.tls_client_ca, module
    assert args.reflection  # reflection stays on, behind the token at the gateway and mutual TLS elsewhere


def admits_only_metrics(rule: dict, metrics_ports: set[int]) -> bool:
    return bool(rule.get("ports")) and {p["port"] for p in rule["ports"]} <= metrics_ports


def parse_probe(command: list[str], port: int):
    """A readiness probe: wait_ready on this container's own port, over mutual TLS."""
    assert command[:3] == ["python", "-m", "services.common.wait_ready"], command
    args = wait_ready.build_parser().parse_args(command[3:])
    (service,) = args.services
    assert service.split("=", 1)[1] == f"127.0.0.1:{port}" and args.tls_ca
    return args


def semsearch_services(compose: dict) -> dict:
    """The compose file's own services (the monitoring profile's Prometheus aside)."""
    return {name: service for name, service in compose["services"].items() if service.get("image") == "semsearch"}


def test_compose_file_fits_together():
    services = semsearch_services(yaml.safe_load((DEPLOY / "docker-compose.yml").read_text()))
    parsed = {name: parse_command(service["command"]) for name, service in services.items()}
    assert all(args.host == "0.0.0.0" for _, args in parsed.values())
    shards = {args.shard: name for name, (module, args) in parsed.items()
              if module.endswith("index.server") and args.shard is not None}
    assert sorted(shards) == [0, 1, 2]
    _, gateway = parsed["gateway"]
    assert gateway.image_shard == [f"{shards[i]}:{parsed[shards[i]][1].port}" for i in range(3)]
    words_host, words_port = gateway.index.split(":")
    assert parsed[words_host][1].indexes == "words" and int(words_port) == parsed[words_host][1].port
    assert gateway.encoder == f"dns:///encoder:{parsed['encoder'][1].port}"
    _, web = parsed["web"]
    assert web.gateway == f"gateway:{gateway.port}" and f"{web.port}:{web.port}" in services["web"]["ports"]
    assert all(volume.endswith(":ro") for volume in services["web"]["volumes"])
    assert f"../artifacts/live:{parsed['index-shard-0'][1].artifacts}/live:ro" in services["web"]["volumes"]
    for name, (module, args) in parsed.items():
        assert_secure(module, args)
        if module not in CLIENTS:
            assert any(volume.endswith(f":{args.artifacts}:ro") for volume in services[name]["volumes"])
            assert services[name]["networks"] == ["backend"] and "ports" not in services[name]
        if name in shards.values():  # image shards write the live-update log
            assert f"../artifacts/live:{args.artifacts}/live" in services[name]["volumes"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["networks"]["backend"]["internal"] is True  # encoder and index unreachable from outside
    assert services["gateway"]["ports"] == [f"{gateway.port}:{gateway.port}"]
    assert {name for name, service in services.items() if "ports" in service} == {"gateway", "web"}
    parse_probe(services["gateway"]["healthcheck"]["test"][1:], gateway.port)
    # the web service shares a network with the gateway, never the backend one; of the secrets it
    # mounts only its TLS files (no service key that encoder and index accept, no token)
    assert "backend" not in services["web"]["networks"]
    assert set(services["web"]["networks"]) & set(services["gateway"]["networks"])
    targets = {volume.split(":")[-2] for volume in services["web"]["volumes"]}
    assert {web.tls_cert, web.tls_key, web.gateway_tls_ca} <= targets
    sources = {Path(volume.split(":")[0]).name for volume in services["web"]["volumes"]}
    assert not sources & {"secrets", "tokens", "service.key"}


def test_kubernetes_manifests_fit_together():
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "semsearch.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    deployments = {name: d for (kind, name), d in kinds.items() if kind == "Deployment"}
    assert len(deployments) == 7
    ports = {}
    for name, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        module, args = parse_command(container["command"] + container["args"])
        ports[name] = args.port
        assert_secure(module, args)
        assert container["ports"][0]["containerPort"] == args.port == container["livenessProbe"]["tcpSocket"]["port"]
        if module == "services.web.server":  # an HTTPS server: kubelet's own probe, on /healthz
            probe = container["readinessProbe"]["httpGet"]
            assert probe["port"] == args.port and probe["path"] == "/healthz" and probe["scheme"] == "HTTPS"
            tls_files = (args.tls_cert, args.tls_key, args.gateway_tls_ca)
        else:
            probe = parse_probe(container["readinessProbe"]["exec"]["command"], args.port)
            assert probe.tls_cert and probe.tls_server_name == f"{name}.semsearch.svc.cluster.local"
            tls_files = (args.tls_cert, args.tls_key, probe.tls_ca)
        mounted = {m["mountPath"] for m in container["volumeMounts"]}
        assert {str(Path(f).parent) for f in tls_files} <= mounted
        service = kinds[("Service", name)]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert service["spec"]["ports"][0]["targetPort"] == args.port
        for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in kinds
            else:  # TLS files and tokens come from Secrets made outside the example (see its header)
                assert volume["secret"]["secretName"] in ("semsearch-tls", "semsearch-gateway-token", "semsearch-web-tls")
        if module == "services.index.server" and args.shard is not None:
            assert name == f"index-shard-{args.shard}" and args.indexes == "images"
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert not mounts[f"{args.artifacts}/live"].get("readOnly") and mounts[args.artifacts]["readOnly"]
    (gateway,) = deployments["gateway"]["spec"]["template"]["spec"]["containers"]
    _, args = parse_command(gateway["command"] + gateway["args"])
    targets = [re.fullmatch(r"dns:///([\w-]+)\.semsearch\.svc\.cluster\.local:(\d+)", t) for t in
               [args.encoder, args.index, *args.image_shard]]
    assert all(targets)
    assert [t[1] for t in targets] == ["encoder", "index-words", "index-shard-0", "index-shard-1", "index-shard-2"]
    assert all(int(t[2]) == ports[t[1]] for t in targets)
    (web,) = deployments["web"]["spec"]["template"]["spec"]["containers"]
    _, web_args = parse_command(web["command"] + web["args"])
    assert web_args.gateway == f"gateway.semsearch.svc.cluster.local:{ports['gateway']}"
    assert web["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert all(mount.get("readOnly") for mount in web["volumeMounts"])
    assert not any(volume["secret"]["secretName"] == "semsearch-gateway-token"
                   for volume in deployments["web"]["spec"]["template"]["spec"]["volumes"] if "secret" in volume)
    for volume in deployments["web"]["spec"]["template"]["spec"]["volumes"]:  # of the service TLS, the CA only
        if volume.get("secret", {}).get("secretName") == "semsearch-tls":
            assert [item["key"] for item in volume["secret"]["items"]] == ["ca.crt"]
    assert kinds[("Service", "gateway")]["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert kinds[("Service", "web")]["spec"]["type"] in ("LoadBalancer", "NodePort")  # the public entry


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

    def rules_for(app: str) -> list[dict]:
        return [rule for p in policies if selects(p, app) for rule in p["spec"].get("ingress", [])]

    def admits(rule: dict, source: str | None, port: int) -> bool:
        """Does this ingress rule let pods labelled app=source (None: any client) reach `port`?"""
        ports = rule.get("ports")
        if ports and not any(p.get("port") == port for p in ports):
            return False
        peers = rule.get("from")
        return not peers or (source is not None and {"podSelector": {"matchLabels": {"app": source}}} in peers)

    metrics_ports = set(metrics.DEFAULT_PORTS.values())
    for app in apps:  # the metrics ports are open to Prometheus' namespace only, and nothing else is
        for rule in rules_for(app):
            if rule.get("ports") and {p["port"] for p in rule["ports"]} <= metrics_ports:
                assert rule["from"] == [{"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": "monitoring"}}}], app
    for app in apps - {"gateway", "web"}:
        rules = [rule for rule in rules_for(app) if not admits_only_metrics(rule, metrics_ports)]
        assert rules and all(rule["from"] == [{"podSelector": {"matchLabels": {"app": "gateway"}}}] for rule in rules), app
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    for name, deployment in deployments.items():  # Prometheus reaches each service's metrics port
        metrics_port = deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
        assert any(rule.get("ports") and int(metrics_port) in {p["port"] for p in rule["ports"]}
                   for rule in rules_for(name)), name
    port = {name: d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
            for name, d in deployments.items()}
    assert any(admits(rule, "web", port["gateway"]) for rule in rules_for("gateway")), "web pods reach the gateway"
    assert any(admits(rule, None, port["web"]) for rule in rules_for("web")), "clients reach the web service"


@pytest.mark.parametrize("line", [x for x in (DEPLOY / "Dockerfile").read_text().splitlines() if x.startswith("COPY ")])
def test_dockerfile_copies_what_exists(line):
    *sources, _ = line.split()[1:]
    assert all((REPO / source).exists() for source in sources), line


KIND_OF = {"services.gateway.server": "gateway", "services.encoder.server": "encoder", "services.index.server": "index",
           "services.web.server": "web"}
METRIC_NAME = re.compile(r"\b(?:grpc_server|semsearch|http_server)_\w+")


def test_services_serve_metrics_on_their_ports_everywhere():
    """Compose, Kubernetes and `make serve`: gateway 9464, encoder 9465, index 9466, web 9467; the scrape
    settings name exactly those targets."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = semsearch_services(compose)
    compose_ports = {}
    for name, service in services.items():
        module, args = parse_command(service["command"])
        if module in KIND_OF:
            assert args.metrics_port == metrics.DEFAULT_PORTS[KIND_OF[module]], name
            compose_ports[name] = args.metrics_port
    prometheus = compose["services"]["prometheus"]  # optional, with its own profile; its UI on loopback only
    assert prometheus["profiles"] == ["monitoring"] and all(p.startswith("127.0.0.1:") for p in prometheus["ports"])
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "backend" in prometheus["networks"]
    scraped = {}
    for job in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            scraped.update((name, sd["port"]) for name in sd["names"])
    assert scraped == compose_ports

    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "semsearch.yaml").read_text()))
    for deployment in (d for d in documents if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        module, args = parse_command(container["command"] + container["args"])
        if module not in KIND_OF:
            continue
        port = metrics.DEFAULT_PORTS[KIND_OF[module]]
        assert args.metrics_port == port and {"containerPort": port, "name": "metrics"} in container["ports"]
        assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port)}
    kubernetes_job = yaml.safe_load((DEPLOY / "kubernetes" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert kubernetes_job["kubernetes_sd_configs"][0]["namespaces"]["names"] == ["semsearch"]

    makefile = (REPO / "Makefile").read_text()
    for kind, port in metrics.DEFAULT_PORTS.items():
        assert f"{kind.upper()}_METRICS_PORT ?= {port}" in makefile
        assert f"--metrics-port $({kind.upper()}_METRICS_PORT)" in makefile


def test_dashboard_queries_only_metrics_the_services_register():
    """Every metric a panel queries is one the services expose, and every one they expose has a panel."""
    import json

    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in METRIC_NAME.findall(expr)}
    registered = metrics.all_metric_names() | metrics.registry_metric_names(WebMetrics().registry)
    assert used and used <= registered, used - registered
    families = {name for name in registered if not name.endswith(("_bucket", "_count", "_sum", "_created"))}
    uncovered = {f for f in families if not any(u == f or u.startswith(f + "_") for u in used)}
    assert not uncovered, uncovered
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
