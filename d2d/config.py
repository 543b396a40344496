"""Configuration from the environment, read in one place.

`D2D_DATABASE_URL` and `D2D_NATS_URL` point at existing servers; without them `d2d up` starts
embedded ones under `D2D_DATA_DIR` (default `./.d2d`). Either URL carries its credentials; a
service's `D2D_DATABASE_URL` logs in as its own role (d2d.dbroles), which holds only what that
service needs, and its `D2D_NATS_URL` as its own NATS user (d2d.bus.permissions).

TLS: to NATS with `D2D_NATS_CA` (the CA file that signed the server's certificate) and, for mutual
TLS, `D2D_NATS_CERT` and `D2D_NATS_KEY` (this client's); to Postgres with `D2D_DATABASE_SSLMODE`
(`verify-full`, say) and `D2D_DATABASE_SSLROOTCERT`, added to the database URL's options unless it
names them itself (the URL's own `sslcert`/`sslkey` options give a client certificate).

TLS on gRPC (`GrpcTls`), optional, mutual if asked: a service serves TLS with `D2D_GRPC_TLS_CERT` and
`D2D_GRPC_TLS_KEY` (its certificate and key) and, with `D2D_GRPC_TLS_CLIENT_CA`, takes only callers
whose certificate that CA signed; a client (every `d2d.grpcserver.channel`: the CLI, `d2d.client`,
service-to-service calls) speaks TLS with `D2D_GRPC_TLS_CA` (the CA that signed the servers'
certificates) and presents `D2D_GRPC_TLS_CLIENT_CERT` and `D2D_GRPC_TLS_CLIENT_KEY`. All PEM files.
API keys are still required over TLS: TLS guards the wire and says which machine calls; the key says
who may do what.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import grpc

from d2d.runtime.services import APIS, service


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


@dataclass(frozen=True)
class GrpcTls:
    """TLS for the platform's gRPC servers and clients (PEM file paths; see the module's docstring).
    Nothing set: plaintext. A configuration that cannot work (a certificate without its key, a file
    that cannot be read or is not what its variable says) is a SystemExit naming the variable, when
    the credentials are made: at a server's start, at a client's first channel."""

    cert: str | None = None  # D2D_GRPC_TLS_CERT: this server's certificate (chain)
    key: str | None = field(default=None, repr=False)  # D2D_GRPC_TLS_KEY: its private key
    client_ca: str | None = None  # D2D_GRPC_TLS_CLIENT_CA: callers must show a certificate it signed
    ca: str | None = None  # D2D_GRPC_TLS_CA: a client's trust in the servers' certificates
    client_cert: str | None = None  # D2D_GRPC_TLS_CLIENT_CERT: the certificate a client shows
    client_key: str | None = field(default=None, repr=False)  # D2D_GRPC_TLS_CLIENT_KEY: its private key

    @classmethod
    def from_env(cls) -> GrpcTls:
        return cls(
            _env("D2D_GRPC_TLS_CERT"), _env("D2D_GRPC_TLS_KEY"), _env("D2D_GRPC_TLS_CLIENT_CA"),
            _env("D2D_GRPC_TLS_CA"), _env("D2D_GRPC_TLS_CLIENT_CERT"), _env("D2D_GRPC_TLS_CLIENT_KEY"),
        )  # fmt: skip

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """A server's credentials: None (plaintext) unless a certificate is set; with a client CA,
        callers without a certificate it signed are refused during the handshake."""
        if not (self.cert or self.key or self.client_ca):
            return None
        _require_pair(("D2D_GRPC_TLS_CERT", self.cert), ("D2D_GRPC_TLS_KEY", self.key))
        if not self.cert:
            raise SystemExit("D2D_GRPC_TLS_CLIENT_CA is set but D2D_GRPC_TLS_CERT is not: mutual TLS needs the"
                             " server's own certificate and key too")  # fmt: skip
        assert self.key
        chain, key = _key_pair(("D2D_GRPC_TLS_CERT", self.cert), ("D2D_GRPC_TLS_KEY", self.key))
        client_ca = _ca("D2D_GRPC_TLS_CLIENT_CA", self.client_ca) if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """A client's credentials: None (plaintext) unless a CA is set; with a client certificate and
        key, for servers that require one (mutual TLS)."""
        if not (self.ca or self.client_cert or self.client_key):
            return None
        _require_pair(("D2D_GRPC_TLS_CLIENT_CERT", self.client_cert), ("D2D_GRPC_TLS_CLIENT_KEY", self.client_key))
        if not self.ca:
            raise SystemExit("D2D_GRPC_TLS_CLIENT_CERT is set but D2D_GRPC_TLS_CA is not: name the CA that signed"
                             " the servers' certificates")  # fmt: skip
        certificate, key = None, None
        if self.client_cert and self.client_key:
            certificate, key = _key_pair(
                ("D2D_GRPC_TLS_CLIENT_CERT", self.client_cert), ("D2D_GRPC_TLS_CLIENT_KEY", self.client_key)
            )
        return grpc.ssl_channel_credentials(
            root_certificates=_ca("D2D_GRPC_TLS_CA", self.ca), private_key=key, certificate_chain=certificate
        )


def _require_pair(first: tuple[str, str | None], second: tuple[str, str | None]) -> None:
    """Both variables set, or neither: else a SystemExit naming the one missing."""
    (name_a, a), (name_b, b) = first, second
    if bool(a) != bool(b):
        have, missing = (name_a, name_b) if a else (name_b, name_a)
        raise SystemExit(f"{have} is set but {missing} is not: a certificate needs its private key (PEM files)")


def _read(variable: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"{variable}: cannot read {path} ({exc.strerror or exc})") from None


def _key_pair(cert: tuple[str, str], key: tuple[str, str]) -> tuple[bytes, bytes]:
    """(certificate chain, private key) as PEM bytes, once the standard library has checked that
    they are PEM and belong together (grpc would only find out at the first handshake)."""
    (cert_variable, cert_path), (key_variable, key_path) = cert, key
    chain, private_key = _read(cert_variable, cert_path), _read(key_variable, key_path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise SystemExit(
            f"{cert_variable} ({cert_path}) and {key_variable} ({key_path}) are not a PEM certificate and"
            f" its private key: {exc.reason or exc}"
        ) from None
    return chain, private_key


def _ca(variable: str, path: str) -> bytes:
    """The CA certificates at `path` (PEM), checked to be some."""
    pem = _read(variable, path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise SystemExit(f"{variable} ({path}) is not a PEM CA certificate: {exc.reason or exc}") from None
    return pem


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("D2D_DATA_DIR", ".d2d")))
    database_url: str | None = field(default_factory=lambda: _database_url_from_env())
    nats_url: str | None = field(default_factory=lambda: os.environ.get("D2D_NATS_URL"))
    # TLS to NATS: the CA that signed the server's certificate, and this client's certificate and key.
    nats_ca: str | None = field(default_factory=lambda: os.environ.get("D2D_NATS_CA") or None)
    nats_cert: str | None = field(default_factory=lambda: os.environ.get("D2D_NATS_CERT") or None)
    nats_key: str | None = field(default_factory=lambda: os.environ.get("D2D_NATS_KEY") or None)
    # Address of each gRPC service (d2d.runtime.services), from its D2D_<NAME>_ADDR: where it
    # listens, and where its clients call it. A service left out is read from the environment.
    addrs: Mapping[str, str] = field(default_factory=lambda: {spec.name: spec.addr_from_env() for spec in APIS})
    # Name of the features service's durable consumer and snapshot: instances with the same name
    # share them (one at a time); another name folds the stream independently.
    features_consumer: str = field(default_factory=lambda: os.environ.get("D2D_FEATURES_CONSUMER", "features"))
    # How often the features service snapshots its state (and acknowledges what it folded).
    features_snapshot_seconds: float = field(
        default_factory=lambda: float(os.environ.get("D2D_FEATURES_SNAPSHOT_SECONDS", "5"))
    )
    # Where serving reads a Predict's features: "local", from the online state of its models' views
    # that it folds itself (under its own consumer and snapshot name `serving_consumer`, which
    # instances share one at a time), or "remote", from the features service over gRPC.
    serving_features: str = field(default_factory=lambda: os.environ.get("D2D_SERVING_FEATURES", "local"))
    serving_consumer: str = field(default_factory=lambda: os.environ.get("D2D_SERVING_CONSUMER", "serving"))
    # Rows (Predicts, BatchPredict rows) serving decides at once; more are refused with
    # RESOURCE_EXHAUSTED and RetryInfo rather than queued.
    serving_max_in_flight: int = field(default_factory=lambda: int(os.environ.get("D2D_SERVING_MAX_IN_FLIGHT", "4000")))
    # Python module whose VIEWS tuple the features service serves.
    feature_views_module: str = field(default_factory=lambda: os.environ.get("D2D_FEATURE_VIEWS", "d2d.sim.views"))
    # Python module whose RULES tuple (d2d.outcomes.OutcomeRule) the feedback service registers at start.
    # What the feedback monitor watches for (JSON: services.feedback.monitor.MonitorSettings fields).
    feedback_monitor_json: str = field(default_factory=lambda: os.environ.get("D2D_FEEDBACK_MONITOR", ""))
    outcome_rules_module: str = field(default_factory=lambda: os.environ.get("D2D_OUTCOME_RULES", "d2d.sim.outcomes"))
    # Python module whose `default_spec()` returns the TrainingSpec `d2d models train` uses without
    # --spec (label, request inputs, slices: the domain's choices; its views should be those served).
    training_defaults_module: str = field(
        default_factory=lambda: os.environ.get("D2D_TRAINING_DEFAULTS", "d2d.sim.training")
    )
    # The registry's closed loop (services/registry/loop.py): retrain on `retrain.requested` and
    # promote through canary without a person. On unless D2D_REGISTRY_RETRAIN_LOOP is 0.
    registry_retrain_loop: bool = field(
        default_factory=lambda: os.environ.get("D2D_REGISTRY_RETRAIN_LOOP", "1").strip().lower() not in ("0", "false")
    )
    # How often the registry asks for a canary's live metrics while it watches one.
    registry_canary_check_seconds: float = field(
        default_factory=lambda: float(os.environ.get("D2D_REGISTRY_CANARY_CHECK_SECONDS", "5"))
    )
    # Labelled decisions (made after the request, past the label window) a model that has been deciding
    # needs before the registry trains its candidate on them.
    registry_retrain_min_labels: int = field(
        default_factory=lambda: int(os.environ.get("D2D_REGISTRY_RETRAIN_MIN_LABELS", "1000"))
    )
    # Python modules (comma-separated) that declare upcasters (d2d.contracts.upcasting), imported at
    # the first upcast by every process that reads payloads.
    upcaster_modules: str = field(default_factory=lambda: os.environ.get("D2D_UPCASTERS", "d2d.sim.upcasters"))
    # Prefix of stream names and subjects (empty in production; tests use one per test).
    nats_namespace: str = field(default_factory=lambda: os.environ.get("D2D_NATS_NAMESPACE", ""))
    # Copies JetStream keeps of each of the platform's streams (bus.Topology.replicas): 3 on a cluster.
    nats_replicas: int = field(default_factory=lambda: int(os.environ.get("D2D_NATS_REPLICAS", "1")))
    # Milliseconds the outbox relay, woken from idle, waits for more events to join a batch (0: it
    # does not wait); unset, the relay's default (d2d.outbox.DEFAULT_LINGER).
    relay_linger_ms: float | None = field(default_factory=lambda: _float_or_none("D2D_RELAY_LINGER_MS"))

    # gRPC server reflection (lists every method and message to any caller): off unless D2D_GRPC_REFLECTION is 1.
    grpc_reflection: bool = field(
        default_factory=lambda: os.environ.get("D2D_GRPC_REFLECTION", "0").strip().lower() in ("1", "true")
    )
    # The API key this process calls the platform's services with (`d2d up` gives each service its
    # admin key; clients and the CLI read it too). Empty: calls carry no key.
    api_key: str = field(default_factory=lambda: os.environ.get("D2D_API_KEY", ""), repr=False)
    # TLS on gRPC (D2D_GRPC_TLS_*): off unless set.
    grpc_tls: GrpcTls = field(default_factory=GrpcTls.from_env)

    def addr(self, name: str) -> str:
        """The address of the gRPC service called `name`."""
        return self.addrs.get(name) or service(name).addr_from_env()

    def require_database_url(self) -> str:
        if not self.database_url:
            raise SystemExit("D2D_DATABASE_URL is not set (d2d up sets it for the services it starts)")
        return self.database_url

    def nats_tls(self) -> ssl.SSLContext | None:
        """The TLS context for NATS the settings describe (None: plain, unless the URL says `tls://`)."""
        if not (self.nats_ca or self.nats_cert):
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.nats_ca)
        if self.nats_cert:
            context.load_cert_chain(self.nats_cert, self.nats_key)
        return context

    def require_nats_url(self) -> str:
        if not self.nats_url:
            raise SystemExit("D2D_NATS_URL is not set (d2d up sets it for the services it starts)")
        return self.nats_url


def _float_or_none(name: str) -> float | None:
    value = os.environ.get(name, "").strip()
    return float(value) if value else None


def _database_url_from_env() -> str | None:
    """`D2D_DATABASE_URL` with the TLS options `D2D_DATABASE_SSLMODE` and `D2D_DATABASE_SSLROOTCERT`
    (those the URL does not set itself)."""
    url = os.environ.get("D2D_DATABASE_URL")
    tls = {"sslmode": "D2D_DATABASE_SSLMODE", "sslrootcert": "D2D_DATABASE_SSLROOTCERT"}
    wanted = {option: os.environ[name] for option, name in tls.items() if os.environ.get(name)}
    if not url or not wanted:
        return url
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    return urlunsplit(parts._replace(query=urlencode({**wanted, **query})))
