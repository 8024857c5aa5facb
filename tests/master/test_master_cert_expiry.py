"""Issue 12 item 9: starting the master with an expired certificate logs a warning (and starts)."""

import time

import pytest
from master_certs import have_openssl, make_expired_cert
from master_fakes import MasterProcess

pytestmark = pytest.mark.slow


def wait_for_line(path, needle: str, timeout_s: float = 30.0) -> list[str]:
    """The lines of ``path`` containing ``needle``, polled until one appears or the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if needle in ln]
        if lines:
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"no line with {needle!r} after {timeout_s}s:\n{path.read_text(errors='replace')}")
        time.sleep(0.02)


@pytest.mark.skipif(not have_openssl(), reason="needs the openssl command")
def test_an_expired_certificate_is_logged_at_start(tmp_path):
    cert_file, key_file = make_expired_cert(tmp_path / "certs")
    master = MasterProcess(tmp_path, "--tls-cert-file", cert_file, "--tls-key-file", key_file)
    try:
        master.start()
        lines = wait_for_line(master.log_file, "expired on")
        assert f"tls_cert_file {cert_file} expired on Jan  2 00:00:00 2000 GMT" in lines[0], lines
        assert "WARNING" in lines[0], lines
        assert master.proc.poll() is None  # a warning, not a refusal: the master serves
    finally:
        master.stop()
    assert master.proc.returncode is not None
    logged = [ln for ln in master.log_file.read_text(errors="replace").splitlines() if "expired on" in ln]
    assert len(logged) == 1, logged  # once, though gRPC and HTTPS both load the certificate
