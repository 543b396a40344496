"""Optional mutual TLS on the platform's gRPC (d2d.config.GrpcTls, the D2D_GRPC_TLS_* variables): a
service served with a certificate and a client CA answers only callers that trust its CA and show a
certificate that CA signed, still asks them for an API key, and a configuration that cannot work
stops the server at start with a message naming the variable. The certificates are made here, in
the test's temp dir, for 127.0.0.1 and localhost."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from d2d import eventlog, grpcserver
from d2d.client import AuditClient
from d2d.config import GrpcTls, Settings
from d2d.runtime.servers import EmbeddedPostgres, free_port
from d2d.v1 import audit_pb2, audit_pb2_grpc
from services.audit.api import SERVICE_NAME
from services.audit.server import serve
from tests.conftest import TEST_API_KEY, seed_test_key, service_url

# ---------------------------------------------------------------------------------------------
# Throwaway certificates


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> tuple[str, str]:
    """Write `certificate` to PATH.crt and `key` to PATH.key (PEM); their paths."""
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


@dataclass(frozen=True)
class Authority:
    """A CA that signs leaf certificates into files."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    cert_path: str

    @classmethod
    def make(cls, directory: Path, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            cls._builder(_name(name), _name(name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256())
        )
        cert_path, _ = _write(directory / name, key, certificate)
        return cls(key, certificate, cert_path)

    @staticmethod
    def _builder(
        subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        )  # fmt: skip

    def issue(self, directory: Path, name: str, *, server: bool) -> tuple[str, str]:
        """A certificate for a server (127.0.0.1 and localhost) or a client, and its key: their paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(_name(name), self.certificate.subject, key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        if server:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return _write(directory / name, key, builder.sign(self.key, hashes.SHA256()))


@dataclass(frozen=True)
class Certificates:
    server: GrpcTls  # the service's: its certificate, key and the client CA
    client: GrpcTls  # a client the service takes: the CA, a certificate it signed and its key
    no_certificate: GrpcTls  # TLS, trusting the CA, showing no certificate
    stranger: GrpcTls  # TLS, trusting the CA, showing a certificate another CA signed


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca, other_ca = Authority.make(directory, "platform-ca"), Authority.make(directory, "other-ca")
    server_cert, server_key = ca.issue(directory, "audit", server=True)
    client_cert, client_key = ca.issue(directory, "app", server=False)
    stranger_cert, stranger_key = other_ca.issue(directory, "stranger", server=False)
    return Certificates(
        server=GrpcTls(cert=server_cert, key=server_key, client_ca=ca.cert_path),
        client=GrpcTls(ca=ca.cert_path, client_cert=client_cert, client_key=client_key),
        no_certificate=GrpcTls(ca=ca.cert_path),
        stranger=GrpcTls(ca=ca.cert_path, client_cert=stranger_cert, client_key=stranger_key),
    )


# ---------------------------------------------------------------------------------------------
# The audit service over mutual TLS, in this process


@pytest.fixture(scope="module")
async def audit_over_tls(postgres: EmbeddedPostgres, certificates: Certificates) -> AsyncIterator[str]:
    """The audit service itself (services/audit/server.py `serve`, in this process) with its
    settings naming a certificate, its key and a client CA: mutual TLS; its address once serving."""
    url = await asyncio.to_thread(postgres.create_database, f"grpc_tls_{uuid.uuid4().hex[:8]}")
    await eventlog.migrate(url)
    await seed_test_key(url)
    addr = f"127.0.0.1:{free_port()}"
    settings = Settings(database_url=service_url(url, "audit"), addrs={"audit": addr}, grpc_tls=certificates.server)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(settings, stop))
    try:
        for _ in range(300):
            assert not serving.done(), serving.exception()
            if await health_code(addr, certificates.client) == grpc.StatusCode.OK:
                break
            await asyncio.sleep(0.1)
        else:
            raise TimeoutError("the audit service did not answer over TLS")
        yield addr
    finally:
        stop.set()
        await serving


async def health_code(addr: str, tls: GrpcTls) -> grpc.StatusCode:
    """How a health check (which needs no API key) over `tls` ends."""
    async with grpcserver.channel(addr, api_key="", tls=tls) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_a_client_with_the_ca_and_a_certificate_it_signed_is_served(
    audit_over_tls: str, certificates: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = certificates.client
    assert client.ca and client.client_cert and client.client_key
    # As a user configures a client (d2d.client, the CLI): the variables.
    monkeypatch.setenv("D2D_GRPC_TLS_CA", client.ca)
    monkeypatch.setenv("D2D_GRPC_TLS_CLIENT_CERT", client.client_cert)
    monkeypatch.setenv("D2D_GRPC_TLS_CLIENT_KEY", client.client_key)
    async with AuditClient(audit_over_tls, api_key=TEST_API_KEY) as audit:
        state = await audit.replay_state(seq=0, timeout=30)
    assert state["seq"] == 0


async def test_an_api_key_is_still_required_over_tls(audit_over_tls: str, certificates: Certificates) -> None:
    async with grpcserver.channel(audit_over_tls, api_key="", tls=certificates.client) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await audit_pb2_grpc.AuditServiceStub(channel).GetReplayState(
                audit_pb2.GetReplayStateRequest(seq=0), timeout=10
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await health_code(audit_over_tls, certificates.client) == grpc.StatusCode.OK  # health stays open


async def test_a_plaintext_client_is_refused(audit_over_tls: str) -> None:
    assert await health_code(audit_over_tls, GrpcTls()) == grpc.StatusCode.UNAVAILABLE


async def test_a_tls_client_without_a_certificate_is_refused(audit_over_tls: str, certificates: Certificates) -> None:
    assert await health_code(audit_over_tls, certificates.no_certificate) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_certificate_another_ca_signed_is_refused(
    audit_over_tls: str, certificates: Certificates
) -> None:
    assert await health_code(audit_over_tls, certificates.stranger) == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------------------------
# Configurations that cannot work stop the server at start, naming the variable


def _bad_configurations(certificates: Certificates, missing: str) -> dict[str, tuple[GrpcTls, str]]:
    """Name -> (a server's or client's configuration, the variable its error must name)."""
    server, client = certificates.server, certificates.client
    return {
        "key file missing": (GrpcTls(cert=server.cert, key=missing), "D2D_GRPC_TLS_KEY"),
        "certificate without key": (GrpcTls(cert=server.cert), "D2D_GRPC_TLS_KEY"),
        "key without certificate": (GrpcTls(key=server.key), "D2D_GRPC_TLS_CERT"),
        "client CA without certificate": (GrpcTls(client_ca=server.client_ca), "D2D_GRPC_TLS_CERT"),
        "certificate with another's key": (GrpcTls(cert=server.cert, key=client.client_key), "D2D_GRPC_TLS_CERT"),
        "client CA file missing": (
            GrpcTls(cert=server.cert, key=server.key, client_ca=missing),
            "D2D_GRPC_TLS_CLIENT_CA",
        ),  # fmt: skip
        "CA that is a key": (GrpcTls(ca=server.key), "D2D_GRPC_TLS_CA"),
        "client certificate without key": (
            GrpcTls(ca=client.ca, client_cert=client.client_cert),
            "D2D_GRPC_TLS_CLIENT_KEY",
        ),  # fmt: skip
        "client key file missing": (
            GrpcTls(ca=client.ca, client_cert=client.client_cert, client_key=missing),
            "D2D_GRPC_TLS_CLIENT_KEY",
        ),  # fmt: skip
    }


BAD = [
    "key file missing", "certificate without key", "key without certificate", "client CA without certificate",
    "certificate with another's key", "client CA file missing", "CA that is a key", "client certificate without key",
    "client key file missing",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
async def test_a_tls_configuration_that_cannot_work_stops_at_start_naming_its_variable(
    case: str, certificates: Certificates, tmp_path: Path
) -> None:  # async: a grpc.aio server is made in a running event loop, as a service makes it
    tls, variable = _bad_configurations(certificates, str(tmp_path / "nowhere.pem"))[case]
    if tls.ca or tls.client_cert or tls.client_key:  # a client's: its first channel
        with pytest.raises(SystemExit) as stopped:
            grpcserver.channel("127.0.0.1:1", tls=tls)
    else:  # a server's: binding its port
        server, _ = grpcserver.new_server([SERVICE_NAME])
        with pytest.raises(SystemExit) as stopped:
            grpcserver.listen(server, f"127.0.0.1:{free_port()}", tls, "audit")
    assert variable in str(stopped.value.code), stopped.value.code
