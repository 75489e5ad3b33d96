"""Transport security and caller authentication shared by the services, the gateway and the clients.

- TLS for a server (`ServerTls`: certificate + key; a client CA turns on mutual TLS) and for a
  channel (`ClientTls`: the CA to trust; a client certificate + key for mutual TLS). Both are off by
  default: the services listen in plaintext on loopback unless given `--tls-cert`/`--tls-key`.
- A bearer-token check (`BearerTokenInterceptor`) for the gateway: a call without
  `authorization: Bearer <token>` metadata, or with a wrong token, is answered UNAUTHENTICATED.
  Health checks stay open, so load balancers and orchestrator probes (which cannot send a token)
  keep working; they disclose only serving status. Server reflection needs the token like any call.

Certificate, key and token files are read once at start-up; an unreadable or malformed one is a
`SecurityConfigError`, which entry points turn into a one-line exit message.
"""

from __future__ import annotations

import argparse
import collections
import hmac
import ipaddress
import logging
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import grpc

from services.common.limits import same_kind

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
# Probes need these without a token (see the module docstring).
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class SecurityConfigError(ValueError):
    """A certificate, key, CA or token file that is missing, unreadable or malformed."""


def _read_pem(path: str | os.PathLike, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"cannot read {what} {path}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"{what} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def _check_pair(cert: str | os.PathLike, key: str | os.PathLike) -> None:
    """Fail at start-up, not at the first handshake, on a key that does not fit its certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as error:
        raise SecurityConfigError(f"TLS certificate {cert} and key {key} do not load as a pair: "
                                  f"{getattr(error, 'reason', None) or error}") from None


def _check_ca(ca: str | os.PathLike, what: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as error:
        raise SecurityConfigError(f"{what} {ca} holds no usable certificate: "
                                  f"{getattr(error, 'reason', None) or error}") from None


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes of a server's certificate chain and key; with `client_ca`, clients must present a
    certificate signed by it (mutual TLS)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: str | os.PathLike, key: str | os.PathLike,
                   client_ca: str | os.PathLike | None = None) -> "ServerTls":
        tls = cls(_read_pem(cert, "TLS certificate"), _read_pem(key, "TLS key"),
                  _read_pem(client_ca, "TLS client CA") if client_ca else None)
        _check_pair(cert, key)
        if client_ca:
            _check_ca(client_ca, "TLS client CA")
        return tls


@dataclass(frozen=True)
class ClientTls:
    """PEM bytes of the CA a client trusts (None: the system roots), and optionally its own
    certificate and key (for servers that require mutual TLS). `server_name` overrides the name
    checked against the server's certificate (for IP addresses or test certificates)."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(cls, ca: str | os.PathLike | None = None, cert: str | os.PathLike | None = None,
                   key: str | os.PathLike | None = None, server_name: str | None = None) -> "ClientTls":
        if bool(cert) != bool(key):
            raise SecurityConfigError("a TLS client certificate and its key go together: give both or neither")
        tls = cls(_read_pem(ca, "TLS CA") if ca else None,
                  _read_pem(cert, "TLS client certificate") if cert else None,
                  _read_pem(key, "TLS client key") if key else None,
                  server_name or None)
        if ca:
            _check_ca(ca, "TLS CA")
        if cert:
            _check_pair(cert, key)
        return tls


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.client_ca,
                                       require_client_auth=tls.client_ca is not None)


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)


def channel(target: str, tls: ClientTls | None = None, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A plaintext channel, or a TLS one when `tls` is given."""
    options = list(options)
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, channel_credentials(tls), options=options)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- bearer tokens -----------------------------------------------------------------------------

def read_tokens(token_file: str | os.PathLike | None = None, env_value: str | None = None) -> list[str]:
    """Tokens from a file (one a line; blank lines and `#` comments ignored) and/or a comma-separated
    environment value. More than one token lets a deployment rotate them without downtime."""
    tokens = [t.strip() for t in (env_value or "").split(",") if t.strip()]
    if token_file:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise SecurityConfigError(f"cannot read token file {token_file}: "
                                      f"{getattr(error, 'strerror', None) or error}") from None
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise SecurityConfigError(f"token file {token_file} holds no token")
        tokens += from_file
    for token in tokens:
        if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
            raise SecurityConfigError("a token must be printable ASCII without whitespace")
    return tokens


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""

    def abort(_request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return same_kind(handler, abort)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Calls need `authorization: Bearer <token>` metadata matching one of `tokens`, compared in
    constant time; health (OPEN_METHOD_PREFIXES) stays open."""

    def __init__(self, tokens: Iterable[str]):
        self._tokens = [token.encode("utf-8") for token in tokens]
        if not self._tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")

    def _valid(self, presented: bytes) -> bool:
        matched = False
        for token in self._tokens:  # compare with every token, so the time says nothing about which
            matched |= hmac.compare_digest(presented, token)
        return matched

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        values = [value for key, value in (handler_call_details.invocation_metadata or ())
                  if key.lower() == AUTHORIZATION]
        if not values:
            return _deny(handler, "missing credentials: send 'authorization: Bearer <token>' metadata")
        scheme, _, presented = str(values[0]).strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return _deny(handler, "malformed authorization metadata: expected 'Bearer <token>'")
        if not self._valid(presented.strip().encode("utf-8")):
            return _deny(handler, "invalid bearer token")
        return handler


class CallDetails(collections.namedtuple("CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                  grpc.ClientCallDetails):
    """A client call's details, as a client interceptor passes them on."""


def add_metadata(details: grpc.ClientCallDetails, pairs) -> grpc.ClientCallDetails:
    """`details` with the metadata `pairs` ((key, value), ...) added to its own."""
    return CallDetails(details.method, details.timeout, [*(details.metadata or ()), *pairs], details.credentials,
                       getattr(details, "wait_for_ready", None), getattr(details, "compression", None))


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call on a channel."""

    def __init__(self, token: str):
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def _details(self, details) -> grpc.ClientCallDetails:
        return add_metadata(details, (self._header,))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def with_token(ch: grpc.Channel, token: str | None) -> grpc.Channel:
    """`ch` sending the bearer token on every call (unchanged when `token` is None or empty)."""
    return grpc.intercept_channel(ch, _TokenMetadata(token)) if token else ch


# --- command-line flags -------------------------------------------------------------------------

def add_server_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls-cert, --tls-key, --tls-client-ca (defaults: $TLS_CERT, $TLS_KEY, $TLS_CLIENT_CA)."""
    env = os.environ.get
    group = parser.add_argument_group("TLS (off unless --tls-cert and --tls-key are given)")
    group.add_argument("--tls-cert", default=env("TLS_CERT"), metavar="PEM",
                       help="this server's certificate chain (default: $TLS_CERT)")
    group.add_argument("--tls-key", default=env("TLS_KEY"), metavar="PEM",
                       help="this server's private key (default: $TLS_KEY)")
    group.add_argument("--tls-client-ca", default=env("TLS_CLIENT_CA"), metavar="PEM",
                       help="require client certificates signed by this CA: mutual TLS (default: $TLS_CLIENT_CA)")


def add_client_tls_arguments(parser: argparse.ArgumentParser, prefix: str = "", env_prefix: str = "",
                             what: str = "the server") -> None:
    """--{prefix}tls-ca, --{prefix}tls-cert, --{prefix}tls-key, --{prefix}tls-server-name, with
    defaults from ${env_prefix}TLS_CA and so on. TLS is on when a CA is given."""
    env = os.environ.get
    group = parser.add_argument_group(f"TLS to {what} (on when --{prefix}tls-ca is given)")
    group.add_argument(f"--{prefix}tls-ca", default=env(f"{env_prefix}TLS_CA"), metavar="PEM",
                       help=f"CA that signed {what}'s certificate; turns TLS on (default: ${env_prefix}TLS_CA)")
    group.add_argument(f"--{prefix}tls-cert", default=env(f"{env_prefix}TLS_CERT"), metavar="PEM",
                       help=f"client certificate, for mutual TLS (default: ${env_prefix}TLS_CERT)")
    group.add_argument(f"--{prefix}tls-key", default=env(f"{env_prefix}TLS_KEY"), metavar="PEM",
                       help=f"client private key, for mutual TLS (default: ${env_prefix}TLS_KEY)")
    group.add_argument(f"--{prefix}tls-server-name", default=env(f"{env_prefix}TLS_SERVER_NAME"), metavar="NAME",
                       help=f"name to expect in {what}'s certificate instead of the address's host "
                            f"(default: ${env_prefix}TLS_SERVER_NAME)")


def add_token_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's --token-file (default $GATEWAY_TOKEN_FILE); $GATEWAY_TOKEN also adds tokens."""
    parser.add_argument("--token-file", default=os.environ.get("GATEWAY_TOKEN_FILE"), metavar="FILE",
                        help="require 'authorization: Bearer <token>' with a token from FILE (one a line); "
                             "$GATEWAY_TOKEN (comma-separated) adds tokens. Health stays open; reflection needs it. "
                             "(default: $GATEWAY_TOKEN_FILE; no token check when neither is set)")


def server_tls_from_args(args: argparse.Namespace) -> ServerTls | None:
    if not args.tls_cert and not args.tls_key:
        if args.tls_client_ca:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (args.tls_cert and args.tls_key):
        raise SecurityConfigError("--tls-cert and --tls-key go together: give both")
    return ServerTls.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)


def client_tls_from_args(args: argparse.Namespace, prefix: str = "") -> ClientTls | None:
    attr = prefix.replace("-", "_")
    ca, cert, key, name = (getattr(args, f"{attr}tls_{field}") for field in ("ca", "cert", "key", "server_name"))
    if not ca:
        if cert or key:
            raise SecurityConfigError(f"--{prefix}tls-cert/--{prefix}tls-key need --{prefix}tls-ca")
        return None
    return ClientTls.from_files(ca, cert, key, name)


def tokens_from_args(args: argparse.Namespace) -> list[str]:
    return read_tokens(args.token_file, os.environ.get("GATEWAY_TOKEN"))


def or_exit(service: str, load, *args):
    """`load(*args)`, exiting with `service: message` (no traceback) on a SecurityConfigError."""
    try:
        return load(*args)
    except SecurityConfigError as error:
        sys.exit(f"{service}: {error}")


def add_port(server: grpc.Server, host: str, port: int, tls: ServerTls | None = None) -> int:
    """Listen on host:port with TLS when `tls` is given, else in plaintext (warned off loopback)."""
    address = f"{host}:{port}"
    if tls is not None:
        return server.add_secure_port(address, server_credentials(tls))
    if not is_loopback(host):
        log.warning("listening on %s without TLS: anyone who can reach it can read and send requests "
                    "(give --tls-cert and --tls-key)", address)
    return server.add_insecure_port(address)
