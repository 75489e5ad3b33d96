"""TLS between every service, mutual TLS, the gateway's bearer token and path safety, over real gRPC on
loopback. The CAs and certificates are made here with the openssl command line."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from semsearch.v1 import encoder_pb2, encoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, index_pb2, index_pb2_grpc
from services.common import security
from services.common.security import ClientTls, SecurityConfigError, ServerTls
from services.common.wait_ready import wait_serving
from services.encoder import server as encoder_server
from services.gateway import cli
from services.gateway import server as gateway_server
from services.gateway.client import Client
from services.index import server as index_server
from services.web import server as web_server
from tests.conftest import Addresses
from tests.helpers import status_of

if shutil.which("openssl") is None:  # fail, not skip: a missing tool must not drop the security tests unseen
    pytest.fail("tests/test_security.py makes its certificates with the openssl command line: install openssl "
                "(Debian/Ubuntu: apt-get install openssl)", pytrace=False)

TOKEN, ROTATED_TOKEN = "s3cret-token-0123456789", "next-token-abcdef"


# --- a throw-away PKI -----------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)
    return directory / f"{name}.pem", directory / f"{name}.key"


def issue(directory: Path, ca: tuple[Path, Path], name: str, serial: int) -> tuple[Path, Path]:
    """A leaf certificate for `localhost` and 127.0.0.1, good for servers and clients."""
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
    (directory / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                           "extendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-set_serial", str(serial),
             "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=directory)
    return directory / f"{name}.pem", directory / f"{name}.key"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    other_ca: Path
    other_client: tuple[Path, Path]

    def trusting(self, ca: Path | None = None, client: tuple[Path, Path] | None = None,
                 server_name: str | None = None) -> ClientTls:
        return ClientTls.from_files(ca or self.ca, *(client or (None, None)), server_name=server_name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(directory, "ca"), make_ca(directory, "other-ca")
    return Pki(ca[0], issue(directory, ca, "server", 2), issue(directory, ca, "client", 3),
               other[0], issue(directory, other, "intruder", 4))


@pytest.fixture(scope="module")
def stack(artifact_root, pki) -> Addresses:
    """Encoder and index require mutual TLS; the gateway speaks TLS, presents its client certificate
    downstream and requires a bearer token."""
    mutual = ServerTls.from_files(*pki.server, client_ca=pki.ca)
    with index_server.run_server(0, str(artifact_root), tls=mutual) as (_, index_port), \
            encoder_server.run_server(0, str(artifact_root), tls=mutual) as (_, encoder_port), \
            gateway_server.run_server(0, f"127.0.0.1:{encoder_port}", f"127.0.0.1:{index_port}",
                                      tls=ServerTls.from_files(*pki.server),
                                      downstream_tls=pki.trusting(client=pki.client),
                                      tokens=[TOKEN, ROTATED_TOKEN]) as (_, port):
        running = Addresses(f"127.0.0.1:{port}", f"127.0.0.1:{encoder_port}", f"127.0.0.1:{index_port}")
        wait_serving(running.index, tls=pki.trusting(client=pki.client))
        wait_serving(running.encoder, tls=pki.trusting(client=pki.client))
        wait_serving(running.gateway, tls=pki.trusting())
        yield running


def health(channel: grpc.Channel):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)


SERVING = health_pb2.HealthCheckResponse.SERVING


# --- TLS ---------------------------------------------------------------------------------------

def test_a_query_runs_end_to_end_over_tls_and_mutual_tls(stack, pki):
    with Client(stack.gateway, tls=pki.trusting(), token=TOKEN) as client:
        hits = client.search("dog", k=5)
        assert len(hits) == 5 and all(h.path for h in hits)
        similar = client.similar(id=hits[0].id, k=3)
        assert len(similar) == 3 and hits[0].id not in {h.id for h in similar}
        assert client.words("dog", k=3)


def test_the_cli_takes_a_ca_and_a_token(stack, pki, capsys):
    assert cli.main(["--gateway", stack.gateway, "--tls-ca", str(pki.ca), "--token", TOKEN,
                     "words", "cat", "-k", "2", "--json"]) == 0
    assert '"words"' in capsys.readouterr().out
    assert cli.main(["--gateway", stack.gateway, "--tls-ca", str(pki.ca), "words", "cat"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_the_web_service_speaks_https_and_passes_the_token_on_over_tls(stack, pki, tmp_path):
    with web_server.run_server(0, stack.gateway, thumbnails=tmp_path, gateway_tls=pki.trusting(),
                               tls_cert=str(pki.server[0]), tls_key=str(pki.server[1])) as (_, port):
        https = ssl.create_default_context(cafile=str(pki.ca))

        def get(path: str, headers: dict) -> tuple[int, dict]:
            request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", headers=headers)
            try:
                with urllib.request.urlopen(request, context=https, timeout=30) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        status, document = get("/api/search?q=dog&k=3", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and len(document["results"]) == 3
        assert get("/api/search?q=dog&k=3", {}) == (401, {"error": "missing credentials: send 'authorization: "
                                                            "Bearer <token>' metadata", "code": "UNAUTHENTICATED"})
        assert get("/healthz", {}) == (200, {"status": "SERVING"})
        with pytest.raises(urllib.error.URLError):  # a client that does not trust our CA is refused
            urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ssl.create_default_context(), timeout=30)


@pytest.mark.parametrize("service", ["gateway", "encoder", "index"])
def test_a_plaintext_client_gets_unavailable(stack, service):
    with grpc.insecure_channel(getattr(stack, service)) as channel:
        assert status_of(health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest())[0] == \
            grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", ["gateway", "index"])
def test_a_client_trusting_another_ca_is_refused(stack, pki, service):
    with security.channel(getattr(stack, service), pki.trusting(pki.other_ca, pki.other_client)) as channel:
        assert status_of(health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest())[0] == \
            grpc.StatusCode.UNAVAILABLE


def test_the_server_name_is_checked(stack, pki):
    with security.channel(stack.gateway, pki.trusting(server_name="localhost")) as channel:
        assert health(channel).status == SERVING
    with security.channel(stack.gateway, pki.trusting(server_name="gateway.example.com")) as channel:
        assert status_of(health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest())[0] == \
            grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", ["encoder", "index"])
def test_mutual_tls_refuses_a_client_without_a_good_certificate(stack, pki, service):
    address = getattr(stack, service)
    for refused in (pki.trusting(), pki.trusting(client=pki.other_client)):
        with security.channel(address, refused) as channel:
            assert status_of(health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest())[0] == \
                grpc.StatusCode.UNAVAILABLE
    with security.channel(address, pki.trusting(client=pki.client)) as channel:
        assert health(channel).status == SERVING
        if service == "encoder":
            assert len(encoder_pb2_grpc.EncoderStub(channel).EncodeText(
                encoder_pb2.EncodeTextRequest(text="cat"), timeout=10).vector.values) == 50


# --- the gateway's bearer token ------------------------------------------------------------------

@pytest.mark.parametrize("metadata, words", [
    ((), "missing credentials"),
    ((("authorization", "Bearer wrong-token"),), "invalid bearer token"),
    ((("authorization", f"Bearer {TOKEN}x"),), "invalid bearer token"),
    ((("authorization", f"Basic {TOKEN}"),), "expected 'Bearer <token>'"),
    ((("authorization", "Bearer"),), "expected 'Bearer <token>'"),
])
def test_the_gateway_needs_a_right_token(stack, pki, metadata, words):
    with security.channel(stack.gateway, pki.trusting()) as channel:
        code, details = status_of(gateway_pb2_grpc.GatewayStub(channel).SimilarWords,
                                gateway_pb2.SimilarWordsRequest(word="cat", k=3), metadata=metadata)
    assert code == grpc.StatusCode.UNAUTHENTICATED and words in details


@pytest.mark.parametrize("token", [TOKEN, ROTATED_TOKEN])
def test_every_configured_token_works(stack, pki, token):
    with security.channel(stack.gateway, pki.trusting()) as channel:
        answer = gateway_pb2_grpc.GatewayStub(channel).SimilarWords(
            gateway_pb2.SimilarWordsRequest(word="cat", k=3), metadata=[("authorization", f"bearer {token}")], timeout=10)
    assert len(answer.words) == 3


def test_health_needs_no_token_but_reflection_does(stack, pki):
    with security.channel(stack.gateway, pki.trusting()) as channel:
        assert health(channel).status == SERVING
        with pytest.raises(grpc.RpcError) as error:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with security.with_token(security.channel(stack.gateway, pki.trusting()), TOKEN) as channel:
        assert "semsearch.v1.Gateway" in set(ProtoReflectionDescriptorDatabase(channel).get_services())


# --- start-up errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--tls-cert", "/no/such/cert.pem", "--tls-key", "/no/such/key.pem"], "cannot read TLS certificate /no/such/cert.pem"),
    (["--tls-cert", "CERT"], "--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "CA"], "--tls-client-ca needs --tls-cert and --tls-key"),
    (["--tls-cert", "CERT", "--tls-key", "NOT_PEM"], "is not a PEM file"),
    (["--tls-cert", "CERT", "--tls-key", "OTHER_KEY"], "do not load as a pair"),
    (["--tls-cert", "CERT", "--tls-key", "KEY", "--tls-client-ca", "KEY"], "holds no usable certificate"),
    (["--downstream-tls-ca", "/no/such/ca.pem"], "cannot read TLS CA /no/such/ca.pem"),
    (["--downstream-tls-ca", "CA", "--downstream-tls-cert", "CERT"], "give both or neither"),
    (["--token-file", "/no/such/tokens"], "cannot read token file /no/such/tokens"),
    (["--token-file", "EMPTY"], "holds no token"),
])
def test_bad_security_flags_stop_the_gateway_with_a_message(pki, tmp_path, flags, words):
    (tmp_path / "not.pem").write_text("hello")
    (tmp_path / "empty").write_text("# no tokens yet\n\n")
    files = {"CERT": str(pki.server[0]), "KEY": str(pki.server[1]), "OTHER_KEY": str(pki.client[1]),
             "CA": str(pki.ca), "NOT_PEM": str(tmp_path / "not.pem"),
             "EMPTY": str(tmp_path / "empty")}
    with pytest.raises(SystemExit) as stopped:
        gateway_server.main(["--port", "0", *[files.get(flag, flag) for flag in flags]])
    assert str(stopped.value.code).startswith("gateway: ") and words in str(stopped.value.code)


def test_tokens_come_from_a_file_and_the_environment(tmp_path):
    (tmp_path / "tokens").write_text("# rotated weekly\nfirst\n\n  second  \n")
    assert security.read_tokens(tmp_path / "tokens", "env-one, env-two") == ["env-one", "env-two", "first", "second"]
    with pytest.raises(SecurityConfigError, match="without whitespace"):
        security.read_tokens(None, "caf\u00e9")


# --- no request names a server-side file -----------------------------------------------------------

_opened: list[str] | None = None


def _record_opens(event: str, args) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
        _opened.append(str(args[0]))


sys.addaudithook(_record_opens)

PATH_LIKE = ["../../etc/passwd", "/etc/passwd", "..\\..\\etc\\passwd", "file:///etc/passwd"]


def test_path_like_ids_are_not_found_and_open_no_file(stack, pki):
    """Ids are looked up in memory and paths in results are only echoed: nothing a request holds
    reaches the file system. (Writes, once AddImages lands, must stay inside the artifact directory.)"""
    global _opened
    _opened = []
    try:
        with security.channel(stack.gateway, pki.trusting()) as gateway_channel, \
                security.channel(stack.index, pki.trusting(client=pki.client)) as index_channel:
            gateway = gateway_pb2_grpc.GatewayStub(security.with_token(gateway_channel, TOKEN))
            index = index_pb2_grpc.IndexStub(index_channel)
            for path in PATH_LIKE:
                assert status_of(gateway.SimilarImages, gateway_pb2.SimilarImagesRequest(id=path, k=3))[0] == \
                    grpc.StatusCode.NOT_FOUND
                assert status_of(index.Search, index_pb2.IndexSearchRequest(index="images", id=path, k=3))[0] == \
                    grpc.StatusCode.NOT_FOUND
                assert status_of(index.GetVectors, index_pb2.GetVectorsRequest(index="images", ids=[path]))[0] == \
                    grpc.StatusCode.NOT_FOUND
                assert status_of(index.Info, index_pb2.IndexInfoRequest(index=path))[0] == grpc.StatusCode.NOT_FOUND
                assert status_of(gateway.Search, gateway_pb2.SearchRequest(text=path, k=3))[0] in \
                    {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}
                assert status_of(gateway.Tag, gateway_pb2.TagRequest(image=path.encode(), k=3))[0] == \
                    grpc.StatusCode.INVALID_ARGUMENT
        with open(os.devnull, "rb"):  # the hook does see opens
            pass
        assert os.devnull in _opened
        touched = [name for name in _opened if "passwd" in name or name.startswith("/etc")]
    finally:
        _opened = None
    assert touched == []
