"""Credentials and TLS for NATS and Redis, read once from the environment (or files) and passed down.

Secrets come from the environment or from files, never from command-line flags (a flag's value is
visible to every user of the machine in `ps`). Every secret field is left out of repr(), and URLs
are logged through `redact_url`, so a config that gets logged leaks nothing.

| what | environment |
|---|---|
| NATS user / password | `KVMESH_NATS_USER`, `KVMESH_NATS_PASSWORD` (or `KVMESH_NATS_PASSWORD_FILE`) |
| NATS token | `KVMESH_NATS_TOKEN` (or `KVMESH_NATS_TOKEN_FILE`) |
| NATS credentials file (JWT + NKey) | `KVMESH_NATS_CREDS` |
| NATS TLS | `KVMESH_NATS_TLS_CA`, `KVMESH_NATS_TLS_CERT`, `KVMESH_NATS_TLS_KEY` (client cert: both) |
| Redis user / password | `KVMESH_REDIS_USERNAME`, `KVMESH_REDIS_PASSWORD` (or `KVMESH_REDIS_PASSWORD_FILE`) |
| Redis TLS | `KVMESH_REDIS_TLS_CA`, `KVMESH_REDIS_TLS_CERT`, `KVMESH_REDIS_TLS_KEY` (or a `rediss://` URL) |

Credentials inside a URL (`nats://user:pass@host`, `redis://:pass@host`) work too; the variables
keep them out of URLs that end up in logs and process listings.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """`name` from the environment, else the content of the file `name_FILE` names (Docker/K8s
    secrets are mounted as files), stripped of its trailing newline."""
    value = env.get(name)
    if value:
        return value
    path = env.get(name + "_FILE")
    if path:
        with open(path) as f:
            return f.read().strip()
    return None


def _tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not (ca or cert):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


@dataclass(frozen=True, slots=True)
class NatsAuth:
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds_file: str | None = None  # NATS decentralized auth: a user's JWT + NKey seed
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NatsAuth:
        env = os.environ if env is None else env
        return cls(
            user=env.get("KVMESH_NATS_USER") or None,
            password=_secret(env, "KVMESH_NATS_PASSWORD"),
            token=_secret(env, "KVMESH_NATS_TOKEN"),
            creds_file=env.get("KVMESH_NATS_CREDS") or None,
            tls_ca=env.get("KVMESH_NATS_TLS_CA") or None,
            tls_cert=env.get("KVMESH_NATS_TLS_CERT") or None,
            tls_key=env.get("KVMESH_NATS_TLS_KEY") or None,
        )

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for nats.connect()."""
        options: dict[str, Any] = {}
        if self.user is not None:
            options["user"] = self.user
            options["password"] = self.password
        if self.token is not None:
            options["token"] = self.token
        if self.creds_file is not None:
            options["user_credentials"] = self.creds_file
        tls = _tls_context(self.tls_ca, self.tls_cert, self.tls_key)
        if tls is not None:
            options["tls"] = tls
        return options


@dataclass(frozen=True, slots=True)
class RedisAuth:
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RedisAuth:
        env = os.environ if env is None else env
        return cls(
            username=env.get("KVMESH_REDIS_USERNAME") or None,
            password=_secret(env, "KVMESH_REDIS_PASSWORD"),
            tls_ca=env.get("KVMESH_REDIS_TLS_CA") or None,
            tls_cert=env.get("KVMESH_REDIS_TLS_CERT") or None,
            tls_key=env.get("KVMESH_REDIS_TLS_KEY") or None,
        )

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for redis.asyncio.Redis.from_url()."""
        options: dict[str, Any] = {}
        if self.username is not None:
            options["username"] = self.username
        if self.password is not None:
            options["password"] = self.password
        if self.tls_ca or self.tls_cert:
            options |= {"ssl": True, "ssl_ca_certs": self.tls_ca}
            if self.tls_cert:
                options |= {"ssl_certfile": self.tls_cert, "ssl_keyfile": self.tls_key}
        return options


def redis_client(url: str, auth: RedisAuth | None = None, **kwargs: Any):
    """An asyncio Redis client for `url` with the credentials of `auth` (default: the environment's)."""
    from redis.asyncio import Redis

    auth = RedisAuth.from_env() if auth is None else auth
    options = auth.client_options()
    if url.startswith("rediss://"):
        options.pop("ssl", None)  # the scheme says it already
    return Redis.from_url(url, **options, **kwargs)


def redact_url(url: str) -> str:
    """`url` with any password replaced by ***, for logs (comma-separated server lists too)."""
    return ",".join(_redact_one(u) for u in url.split(","))


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None and not (parts.username and "@" in parts.netloc):
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    # nats://TOKEN@host carries a token as the "user"
    userinfo = f"{user}:***" if parts.password is not None else "***"
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))
