"""The container and orchestrator examples: valid YAML whose commands the real services accept,
with ports, shards and addresses that fit together."""

import importlib
import re

import pytest
import yaml

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
SERVERS = {"services.index.server", "services.encoder.server", "services.gateway.server", "services.web.server"}
CLIENTS = {"services.gateway.server", "services.web.server"}  # no artifact of their own


def parse_command(command: list[str]):
    """["python", "-m", module, *flags] -> (module, the flags as that service's own parser reads them)."""
    assert all(isinstance(part, str) for part in command), f"non-string argument in {command}"
    assert command[:2] == ["python", "-m"] and command[2] in SERVERS, command
    return command[2], importlib.import_module(command[2]).build_parser().parse_args(command[3:])


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
    _, web = parsed["web"]
    assert web.gateway == f"gateway:{gateway.port}" and f"{web.port}:{web.port}" in services["web"]["ports"]
    assert all(volume.endswith(":ro") for volume in services["web"]["volumes"])
    assert f"../artifacts/live:{parsed['index-shard-0'][1].artifacts}/live:ro" in services["web"]["volumes"]
    for name, (module, args) in parsed.items():
        if module not in CLIENTS:
            assert any(volume.endswith(f":{args.artifacts}:ro") for volume in services[name]["volumes"])
        if name in shards.values():  # image shards write the live-update log
            assert f"../artifacts/live:{args.artifacts}/live" in services[name]["volumes"]


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
        probe = container["readinessProbe"]
        probed = probe["httpGet"]["port"] if module == "services.web.server" else probe["grpc"]["port"]
        assert container["ports"][0]["containerPort"] == args.port == probed
        service = kinds[("Service", name)]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert service["spec"]["ports"][0]["targetPort"] == args.port
        for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
            assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in kinds
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
    (web,) = deployments["web"]["spec"]["template"]["spec"]["containers"]
    _, web_args = parse_command(web["command"] + web["args"])
    assert web_args.gateway == f"gateway.semsearch.svc.cluster.local:{ports['gateway']}"
    assert web["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert all(mount.get("readOnly") for mount in web["volumeMounts"])


@pytest.mark.parametrize("line", [l for l in (DEPLOY / "Dockerfile").read_text().splitlines() if l.startswith("COPY ")])
def test_dockerfile_copies_what_exists(line):
    *sources, _ = line.split()[1:]
    assert all((REPO / source).exists() for source in sources), line
