"""What the config needs of the machine and the environment: the secrets its variables name, the
address it binds, and what must hold before serving."""

from __future__ import annotations

import importlib.util
import ipaddress

from msgspec.structs import replace

from .schema import Config, ConfigError

# --- the machine and the environment -----------------------------------------------------


def _bracketed(host: str) -> str:
    """A bind address as a Host header names it: IPv6 in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host.lower()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def missing_secrets(config: Config) -> list[str]:
    """Environment variables the config names whose value is unset, each said as a person reads it."""
    found = []
    env = config.server.admin_token_env
    if env and config.server.admin_token() is None:
        found.append(f"server.admin_token_env names ${env}, which is unset: the admin endpoints (/stats, "
                     f"/stats/history, /stats/calls, /stats/export.csv, /stats/snapshot.csv, /metrics, "
                     f"/metrics/reset, /cache/purge, /dashboard) are open to every program on this machine")
    for upstream in config.upstreams.values():
        if upstream.api_key_env and upstream.api_key() is None:
            found.append(f"upstreams.{upstream.name}.api_key_env names ${upstream.api_key_env}, which is unset: "
                         f"calls to it go without a key and will be refused")
    for hook in config.alerts.webhooks.values():
        if hook.url() is None:
            found.append(f"alerts.webhooks.{hook.name}.url_env names ${hook.url_env}, which is unset: "
                         f"its alerts cannot be delivered")
    return found


def with_workers(config: Config, workers: int) -> Config:
    return replace(config, server=replace(config.server, workers=workers))


def with_bind(config: Config, host: str, port: int) -> Config:
    """`config` serving on `host`:`port` (command-line overrides), answering for that host too."""
    server = replace(config.server, host=host, port=port,
                     allowed_hosts=config.server.allowed_hosts | {_bracketed(host)})
    return replace(config, server=server)


def check_serve(config: Config) -> None:
    """What must hold before serving: a safe bind address, and every proxy key's secret set."""
    check_bind(config)
    for key in config.keys.values():
        if key.secret() is None:
            raise ConfigError(f"{config.source}: keys.{key.name}.key_env = {key.key_env!r}: "
                              f"expected that environment variable to hold the key, but it is unset")
    if config.server.workers > 1 and config.limits.backend != "redis":
        raise ConfigError(f"{config.source}: server.workers = {config.server.workers}: expected 1 unless "
                          f"limits.backend = 'redis' (each worker would hold every limit alone, letting through up "
                          f"to {config.server.workers} times each limit)")
    if config.ledger.backend == "postgresql" and config.ledger.dsn() is None:
        raise ConfigError(f"{config.source}: ledger.backend = 'postgresql': expected ${config.ledger.dsn_env} "
                          f"(ledger.dsn_env) to hold the connection string, but it is unset")
    for what, backend in (("limits.backend", config.limits.backend), ("cache.backend", config.cache.backend)):
        if backend == "redis" and config.redis.url() is None:
            raise ConfigError(f"{config.source}: {what} = 'redis': expected ${config.redis.url_env} "
                              f"(redis.url_env) to hold the Redis URL, but it is unset")
    if any(rule.semantic for rule in config.cache.rules) and importlib.util.find_spec("numpy") is None:
        raise ConfigError(f"{config.source}: cache.rules: semantic = true: expected numpy, which compares the "
                          f"questions, but it is not installed (pip install 'tollgate[semantic]')")


def check_bind(config: Config) -> None:
    """Refuse to listen beyond loopback when nobody set an admin token."""
    if not _is_loopback(config.server.host) and config.server.admin_token() is None:
        env = config.server.admin_token_env or "<unset>"
        raise ConfigError(
            f"{config.source}: server.host = {config.server.host!r}: a non-loopback address needs "
            f"an admin token (set server.admin_token_env and the variable it names, now {env})"
        )
