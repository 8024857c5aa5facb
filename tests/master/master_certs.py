"""Test certificates: a throw-away CA, a server certificate for localhost/127.0.0.1 and a client
certificate, made with the ``openssl`` command (the venv has no ``cryptography`` package)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TestCerts:
    __test__ = False  # not a pytest test class

    ca_file: str
    server_cert_file: str
    server_key_file: str
    client_cert_file: str
    client_key_file: str
    other_ca_file: str  # a CA that signed nothing here (for "wrong CA" tests)
    client2_cert_file: str = ""  # another client of the same CA (another node's certificate)
    client2_key_file: str = ""


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _run(args: list[str], cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key_and_csr(cwd: Path, name: str, cn: str) -> None:
    _run(
        ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}"],
        cwd,
    )  # fmt: skip


def _self_signed_ca(cwd: Path, name: str) -> None:
    _run(
        ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        cwd,
    )  # fmt: skip


def _sign(cwd: Path, name: str, ext: str) -> None:
    (cwd / f"{name}.ext").write_text(ext)
    _run(
        ["x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext"],
        cwd,
    )  # fmt: skip


def make_certs(directory: str | Path) -> TestCerts:
    """Create the CA, server and client certificates under ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _self_signed_ca(d, "ca")
    _self_signed_ca(d, "other-ca")
    _key_and_csr(d, "server", "localhost")
    _sign(
        d,
        "server",
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    _key_and_csr(d, "client", "oobleck-test-client")
    _sign(d, "client", "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    _key_and_csr(d, "client2", "oobleck-test-client-2")
    _sign(d, "client2", "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    return TestCerts(
        ca_file=str(d / "ca.pem"),
        server_cert_file=str(d / "server.pem"),
        server_key_file=str(d / "server.key"),
        client_cert_file=str(d / "client.pem"),
        client_key_file=str(d / "client.key"),
        other_ca_file=str(d / "other-ca.pem"),
        client2_cert_file=str(d / "client2.pem"),
        client2_key_file=str(d / "client2.key"),
    )


def make_expired_cert(directory: str | Path, cn: str = "localhost") -> tuple[str, str]:
    """A self-signed server certificate for localhost/127.0.0.1 valid only on 1 January 2000
    (``openssl req -x509`` cannot backdate, ``openssl ca`` can); returns ``(cert_file, key_file)``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "expired-ca.cnf").write_text(
        "[ca]\ndefault_ca = d\n[d]\ndatabase = expired-index.txt\nnew_certs_dir = .\nserial = expired-serial\n"
        "default_md = sha256\npolicy = p\nunique_subject = no\ncopy_extensions = copy\n[p]\ncommonName = supplied\n"
    )
    (d / "expired-index.txt").write_text("")
    (d / "expired-serial").write_text("01\n")
    _run(
        ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "expired.key", "-out", "expired.csr", "-subj", f"/CN={cn}",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        d,
    )  # fmt: skip
    _run(
        ["ca", "-batch", "-notext", "-selfsign", "-config", "expired-ca.cnf", "-keyfile", "expired.key",
         "-in", "expired.csr", "-out", "expired.pem", "-startdate", "20000101000000Z", "-enddate", "20000102000000Z"],
        d,
    )  # fmt: skip
    return str(d / "expired.pem"), str(d / "expired.key")
