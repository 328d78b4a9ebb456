"""A throwaway certificate authority and a server certificate for 127.0.0.1.

The emulator's REST server must speak HTTPS: azure-core's bearer-token policy refuses to send a token
over plain HTTP unless a call passes ``enforce_https=False``, and ``MLClient.workspaces.get`` (which
``jobs.stream`` calls to find the run-history URL) never does. Clients trust the CA through
``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` (``env()``) or ``connection_verify`` (``ml_client()``);
the bundle written here is certifi's roots plus this CA, so other HTTPS traffic still verifies.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # server certificate chain (leaf + CA), PEM
    key: Path  # server private key, PEM
    ca: Path  # the CA certificate alone
    bundle: Path  # certifi's roots + the CA: what clients should trust


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "airflow-stepops emulator"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_tls_files(directory: Path) -> TlsFiles:
    """Make a CA and a 127.0.0.1/localhost server certificate signed by it, valid for two days."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("stepops Azure ML emulator CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(ca_ski, critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    files = TlsFiles(directory / "server.pem", directory / "server.key", directory / "ca.pem",
                     directory / "ca-bundle.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.key.chmod(0o600)
    files.ca.write_bytes(ca_pem)
    try:
        import certifi

        roots = Path(certifi.where()).read_bytes()
    except ImportError:  # no certifi: the bundle trusts the emulator only
        roots = b""
    files.bundle.write_bytes(roots.rstrip(b"\n") + b"\n" + ca_pem if roots else ca_pem)
    return files
