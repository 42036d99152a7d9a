"""Mutual TLS between coordinator and nodes, with certificates made here by `cryptography`:
the right pair works (and gives the same tokens); a coordinator without TLS, or with a
certificate from another CA, is refused with one clear line naming the node."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.nodes import NodeProcess

x509 = pytest.importorskip("cryptography.x509", reason="cryptography makes the test certificates")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.slow]


def _name(cn: str):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(directory: Path, stem: str, key, cert) -> tuple[Path, Path]:
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def make_ca(directory: Path, cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, _ = _write(directory, cn, key, cert)
    return key, cert, cert_path


def issue(directory: Path, ca, cn: str) -> tuple[Path, Path]:
    ca_key, ca_cert, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _write(directory, cn, key, cert)


def caravan(*args):
    return subprocess.run([sys.executable, "-m", "caravan.coordinator", "run", "The capital of France is",
                           "--temperature", "0", "-n", "8", "--json", "-t", "1", *args],
                          capture_output=True, text=True, timeout=180)


def test_mutual_tls(smollm2_path, tmp_path):
    ca = make_ca(tmp_path, "cluster-ca")
    rogue = make_ca(tmp_path, "rogue-ca")
    coord_cert, coord_key = issue(tmp_path, ca, "coordinator")
    rogue_cert, rogue_key = issue(tmp_path, rogue, "intruder")
    nodes = []
    for name in ("tlspi", "tlspi2"):  # two, so the first passes hidden states to the second over TLS too
        cert, key = issue(tmp_path, ca, name)
        nodes.append(NodeProcess(tmp_path / name, "--tls-cert", str(cert), "--tls-key", str(key),
                                 "--tls-ca", str(ca[2]), name=name))
    node = nodes[0]
    try:
        local = caravan()
        good = caravan("--nodes", ",".join(n.address for n in nodes), "--tls-cert", str(coord_cert),
                       "--tls-key", str(coord_key), "--tls-ca", str(ca[2]))
        assert good.returncode == 0, good.stderr
        assert json.loads(good.stdout)["tokens"] == json.loads(local.stdout)["tokens"]
        listed = subprocess.run([sys.executable, "-m", "caravan.coordinator", "nodes", "--json", "--nodes",
                                 ",".join(n.address for n in nodes), "--tls-cert", str(coord_cert), "--tls-key",
                                 str(coord_key), "--tls-ca", str(ca[2])], capture_output=True, text=True, timeout=120)
        assert all(row["layers"] for row in json.loads(listed.stdout)["nodes"]), listed.stdout  # both held layers

        for refused in (caravan("--nodes", node.address),  # no TLS at all
                        caravan("--nodes", node.address, "--tls-cert", str(rogue_cert), "--tls-key", str(rogue_key),
                                "--tls-ca", str(ca[2]))):  # a certificate the node's CA did not sign
            assert refused.returncode == 1
            assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
            assert node.address in refused.stderr and "unreachable" in refused.stderr

        half = caravan("--nodes", node.address, "--tls-cert", str(coord_cert))
        assert half.returncode == 1 and "needs all three of --tls-cert, --tls-key and --tls-ca" in half.stderr
        assert node.proc.poll() is None
    finally:
        for n in nodes:
            n.stop()
