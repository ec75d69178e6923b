"""NATS and Redis credentials from config, against real servers that demand them: nats-server with
--user/--pass, --auth (token) and TLS; redis-server with --requirepass. Secrets stay out of reprs,
URLs in logs and a real service's log."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from redis.exceptions import AuthenticationError, ResponseError

from kvmesh.libs.bus import Bus, BusError
from kvmesh.libs.credentials import NatsAuth, RedisAuth, redact_url, redis_client
from kvmesh.libs.launcher import free_port, nats_server_binary, start_redis_server, wait_for_port
from kvmesh.schemas.messages import RouterHealth, RouterHealthRequest, Subjects

PASSWORD = "pw-7f3c91d2e4"
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20  # OpenSSL: the chain ends at a CA nobody trusts


def nats_server(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), *args], stderr=subprocess.DEVNULL
    )
    wait_for_port(port, 10, proc)
    return proc, f"nats://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def nats_with_password():
    proc, url = nats_server("--user", "kvmesh", "--pass", PASSWORD)
    yield url
    proc.terminate()
    proc.wait(10)


async def echo_roundtrip(url: str, auth: NatsAuth) -> bool:
    bus = await Bus.connect(url, "test", auth=auth)
    try:

        async def answer(_req, _raw):
            return RouterHealth(
                workers=["x"], kv_index_ok=True, decisions={}, hit_tokens=0, available_hit_tokens=0
            )

        await bus.serve("test.echo", RouterHealthRequest, answer)
        reply = await bus.request("test.echo", RouterHealthRequest(), RouterHealth, timeout=5)
        return reply.workers == ["x"]
    finally:
        await bus.close()


async def test_nats_user_and_password(nats_with_password):
    assert await echo_roundtrip(nats_with_password, NatsAuth(user="kvmesh", password=PASSWORD))
    for wrong in (NatsAuth(user="kvmesh", password="nope"), NatsAuth()):
        with pytest.raises(BusError, match="refused the credentials"):
            await asyncio.wait_for(Bus.connect(nats_with_password, "test", auth=wrong), 30)


def test_a_real_service_takes_its_nats_credentials_from_the_environment(nats_with_password, tmp_path):
    """The router process, given KVMESH_NATS_USER / KVMESH_NATS_PASSWORD_FILE, serves; its log keeps
    the password out."""
    secret = tmp_path / "nats-password"
    secret.write_text(PASSWORD + "\n")
    env = {
        **os.environ,
        "KVMESH_NATS_URL": nats_with_password,
        "KVMESH_NATS_USER": "kvmesh",
        "KVMESH_NATS_PASSWORD_FILE": str(secret),
        "KVMESH_LOG_LEVEL": "DEBUG",
        "KVMESH_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    log = tmp_path / "router.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmesh.services.router"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:

        async def ask() -> RouterHealth:
            bus = await Bus.connect(
                nats_with_password, "test", auth=NatsAuth(user="kvmesh", password=PASSWORD)
            )
            try:
                for _ in range(300):
                    try:
                        return await bus.request(
                            Subjects.ROUTER_HEALTH, RouterHealthRequest(), RouterHealth, 1
                        )
                    except BusError:
                        assert proc.poll() is None, log.read_text()
                        await asyncio.sleep(0.1)
                raise AssertionError("the router never answered")
            finally:
                await bus.close()

        assert asyncio.run(ask()).workers == []
    finally:
        proc.terminate()
        proc.wait(20)
    assert PASSWORD not in log.read_text()


async def test_nats_token():
    proc, url = nats_server("--auth", "tok-" + PASSWORD)
    try:
        assert await echo_roundtrip(url, NatsAuth(token="tok-" + PASSWORD))
        with pytest.raises(BusError):
            await asyncio.wait_for(Bus.connect(url, "test", auth=NatsAuth(token="wrong")), 30)
    finally:
        proc.terminate()
        proc.wait(10)


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    p = {n: folder / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem", "ext.cnf")}
    p["ext.cnf"].write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ca, ca_key, srv, srv_key, csr = (str(p[n]) for n in ("ca.pem", "ca.key", "srv.pem", "srv.key", "srv.csr"))
    new_key = ["-newkey", "rsa:2048", "-nodes"]
    ssl("req", "-x509", *new_key, "-days", "2", "-subj", "/CN=kvmesh-test-ca", "-keyout", ca_key, "-out", ca)
    ssl("req", *new_key, "-subj", "/CN=127.0.0.1", "-keyout", srv_key, "-out", csr)
    extfile = str(p["ext.cnf"])
    sign = ["-CA", ca, "-CAkey", ca_key, "-set_serial", "1", "-days", "2", "-extfile", extfile]
    ssl("x509", "-req", "-in", csr, *sign, "-out", srv)
    return p


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make certificates")
async def test_nats_tls_with_our_ca(tmp_path):
    certs = make_certs(tmp_path)
    proc, url = nats_server("--tls", "--tlscert", str(certs["srv.pem"]), "--tlskey", str(certs["srv.key"]))
    try:
        url = url.replace("nats://", "tls://")
        assert await echo_roundtrip(url, NatsAuth(tls_ca=str(certs["ca.pem"])))
        # the system CAs do not trust ours: the handshake fails on verification (not a refusal, not a
        # timeout), and Bus.connect says so at once instead of retrying forever
        with pytest.raises(BusError, match="TLS certificate failed verification") as info:
            await asyncio.wait_for(Bus.connect(url, "test", auth=NatsAuth(), connect_timeout=2), 30)
        cause = info.value.__cause__
        assert isinstance(cause, ssl.SSLCertVerificationError), repr(cause)
        assert cause.verify_code == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY, cause.verify_message
    finally:
        proc.terminate()
        proc.wait(10)


async def test_redis_password():
    port = free_port()
    proc = start_redis_server(port, stdout=subprocess.DEVNULL)  # then demand a password:
    url = f"redis://127.0.0.1:{port}"
    try:
        admin = redis_client(url, RedisAuth())
        await admin.config_set("requirepass", PASSWORD)
        await admin.aclose()
        good = redis_client(url, RedisAuth(password=PASSWORD))
        assert await good.set("k", "v") and await good.get("k") == b"v"
        await good.aclose()
        for auth in (RedisAuth(), RedisAuth(password="nope")):
            bad = redis_client(url, auth)
            with pytest.raises((AuthenticationError, ResponseError)):
                await bad.get("k")
            await bad.aclose()
        from_env = redis_client(url, RedisAuth.from_env({"KVMESH_REDIS_PASSWORD": PASSWORD}))
        assert await from_env.get("k") == b"v"
        await from_env.aclose()
    finally:
        proc.terminate()
        proc.wait(10)


def test_secrets_stay_out_of_reprs_and_logged_urls(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("tok-secret\n")
    auth = NatsAuth.from_env(
        {
            "KVMESH_NATS_USER": "u",
            "KVMESH_NATS_PASSWORD": "pw-secret",
            "KVMESH_NATS_TOKEN_FILE": str(token_file),
        }
    )
    assert (auth.user, auth.password, auth.token) == ("u", "pw-secret", "tok-secret")
    assert "secret" not in repr(auth) and "secret" not in repr(RedisAuth(password="pw-secret"))
    assert (
        redact_url("nats://u:pw-secret@10.0.0.1:4222,nats://h2:4222")
        == "nats://u:***@10.0.0.1:4222,nats://h2:4222"
    )
    assert redact_url("nats://tok-secret@h:4222") == "nats://***@h:4222"
    assert redact_url("rediss://:pw-secret@redis:6380/0") == "rediss://:***@redis:6380/0"
    assert redact_url("redis://redis:6379") == "redis://redis:6379"
    opts = RedisAuth(password="p", tls_ca="/ca.pem").client_options()
    assert opts["ssl"] is True and opts["ssl_ca_certs"] == "/ca.pem"
