"""Credentials for a Flower federation: a CA, the SuperLink's TLS certificate and SuperNode key pairs.

    python deploy/certs.py --out creds --hosts localhost,127.0.0.1,superlink.example.org --supernodes 3

writes
    creds/ca.crt, creds/ca.key               the certificate authority (keep ca.key private)
    creds/superlink.crt, creds/superlink.key the SuperLink's certificate, valid for every --hosts name or IP
    creds/supernode-<i>, creds/supernode-<i>.pub
                                             SuperNode authentication keys (ECDSA P-384, OpenSSH format,
                                             what `flower-supernode --auth-supernode-private-key` and
                                             `flwr supernode register` read)

The SuperLink's own SuperExec reaches it on 127.0.0.1, so that address is always in the certificate.
Existing files are never overwritten: rerun with a larger --supernodes to add keys.
Uses `cryptography`, which Flower already depends on; no openssl or ssh-keygen needed.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, private: bool = False) -> None:
    # A private key is created readable by its owner only, never world-readable even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmm"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(out: Path, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if (out / "ca.crt").exists():
        key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
        return x509.load_pem_x509_certificate((out / "ca.crt").read_bytes()), key  # type: ignore[return-value]
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("fedmm federation CA")).issuer_name(_name("fedmm federation CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(out / "ca.key", _pem_key(key), private=True)
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_superlink_cert(out: Path, hosts: list[str], ca: x509.Certificate, ca_key, days: int) -> None:
    if (out / "superlink.crt").exists():
        return
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(_san(hosts), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(out / "superlink.key", _pem_key(key), private=True)
    _write(out / "superlink.crt", cert.public_bytes(serialization.Encoding.PEM))


def make_supernode_key(out: Path, index: int) -> None:
    path = out / f"supernode-{index}"
    if path.exists():
        return
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(Path(f"{path}.pub"), public + f" supernode-{index}\n".encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the credentials")
    parser.add_argument("--hosts", default="localhost,127.0.0.1",
                        help="comma-separated names and IPs the SuperLink is reached by")
    parser.add_argument("--supernodes", type=int, default=0, help="SuperNode key pairs to make (0..N-1)")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates")
    args = parser.parse_args(argv)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not hosts:
        parser.error("--hosts names no host")
    if "127.0.0.1" not in hosts:
        hosts.append("127.0.0.1")
    if args.supernodes < 0 or args.days <= 0:
        parser.error("--supernodes must be >= 0 and --days > 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ca, ca_key = make_ca(out, args.days)
    make_superlink_cert(out, hosts, ca, ca_key, args.days)
    for i in range(args.supernodes):
        make_supernode_key(out, i)
    print(f"credentials in {out}: ca.crt, superlink.crt/.key for {hosts}, {args.supernodes} SuperNode key pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
