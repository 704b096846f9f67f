"""TLS and per-organisation credentials for the data plane.

``generate_credentials`` makes a self-signed CA, a certificate and key per organisation (valid
as both server and client certificate, so mutual TLS works) and a random bearer token per
organisation: enough for tests and first deployments. Production deployments bring their own
CA; the files are the same shape.

Each organisation gets its own token (``NAME.token``) and everyone's *verifiers*
(``verifiers.yaml``: SHA-256 of each token), which is all a server needs to check a caller. So
no organisation holds a file from which it could present another's token.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VERIFIERS_FILE = "verifiers.yaml"


@dataclass(frozen=True)
class TLSConfig:
    """PEM bytes of the CA that signs every organisation, and of this party's certificate."""

    ca_cert: bytes
    cert: bytes
    key: bytes
    mutual: bool = True

    @classmethod
    def load(cls, directory: str | Path, name: str, mutual: bool = True) -> TLSConfig:
        d = Path(directory)
        missing = [p for p in (d / "ca.pem", d / f"{name}.pem", d / f"{name}.key") if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"TLS files missing for '{name}': {', '.join(map(str, missing))} (make them with `fedsplit certs`)"
            )
        return cls(
            (d / "ca.pem").read_bytes(), (d / f"{name}.pem").read_bytes(), (d / f"{name}.key").read_bytes(), mutual
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca_cert if self.mutual else None,
            require_client_auth=self.mutual,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if self.mutual:
            return grpc.ssl_channel_credentials(self.ca_cert, self.key, self.cert)
        return grpc.ssl_channel_credentials(self.ca_cert)


def token_verifier(token: str) -> str:
    """What a server keeps to check ``token``: its SHA-256 (tokens are 256 random bits)."""
    return hashlib.sha256(token.encode()).hexdigest()


def load_token(directory: str | Path, name: str) -> str:
    path = Path(directory) / f"{name}.token"
    if not path.exists():
        raise FileNotFoundError(f"no token for '{name}': {path} is missing (make it with `fedsplit certs`)")
    return path.read_text().strip()


def load_verifiers(directory: str | Path) -> dict[str, str]:
    path = Path(directory) / VERIFIERS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (make it with `fedsplit certs`)")
    verifiers = yaml.safe_load(path.read_text())
    if not isinstance(verifiers, dict) or not all(isinstance(v, str) for v in verifiers.values()):
        raise ValueError(f"{path}: expected a mapping of organisation name to token verifier")
    return verifiers


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsplit"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_credentials(
    names: Iterable[str],
    out: str | Path,
    hosts: Iterable[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    keep_ca_key: bool = True,
) -> Path:
    """Write ``ca.pem``/``ca.key``, ``NAME.pem``/``NAME.key``/``NAME.token`` for each name, and
    ``verifiers.yaml``. Without ``keep_ca_key`` the CA's private key is never written: nobody can
    sign another certificate for this CA once the call returns (a run's own credentials)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fedsplit CA"))
        .issuer_name(_name("fedsplit CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    if keep_ca_key:
        _write_private(out / "ca.key", _key_pem(ca_key))
    else:  # nor an older run's key beside this CA's certificate
        (out / "ca.key").unlink(missing_ok=True)
    alt = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    verifiers = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(out / f"{name}.key", _key_pem(key))
        token = secrets.token_urlsafe(32)
        _write_private(out / f"{name}.token", token.encode())
        verifiers[name] = token_verifier(token)
    (out / VERIFIERS_FILE).write_text(yaml.safe_dump(verifiers))
    return out
