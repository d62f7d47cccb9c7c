"""TLS for an app whose processes span machines: one certificate, made at ``run()``.

The internal plane is TLS on every TCP connection between nodes: servers present
the app's certificate (name ``streamwise-internal``, whatever the node's address)
and clients trust only that certificate, so no other server can stand in for one
of the app's. Clients still prove themselves with the app's secret on every call
(``_auth``): TLS keeps that secret, and the pickles, off the network in the clear.
Needs ``cryptography`` (installed with the ``streamwise[ray]`` extra).
"""

from __future__ import annotations

import dataclasses
import datetime

from streamwise.exceptions import UsageError

SERVER_NAME = "streamwise-internal"
_VALID_DAYS = 30


@dataclasses.dataclass(frozen=True, repr=False)
class TlsPair:
    certificate: bytes  # PEM
    private_key: bytes  # PEM

    def __repr__(self) -> str:
        return "TlsPair(<certificate>, <private key hidden>)"


def new_pair() -> TlsPair:
    """A fresh self-signed certificate and its key, for one app's internal plane."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise UsageError(
            "an app spanning machines needs the cryptography package for its internal TLS: "
            "pip install 'streamwise[ray]'"
        ) from None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return TlsPair(
        certificate=certificate.public_bytes(serialization.Encoding.PEM),
        private_key=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
