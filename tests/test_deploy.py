"""deploy/compose.yaml and the files it names: parsed, present, and saying what Tollgate reads."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import config as config_mod

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    found: dict[str, Any] = load_yaml(DEPLOY / "compose.yaml")
    return found


def local_sources(service: dict[str, Any]) -> list[Path]:
    """The files and folders of this repository a service mounts."""
    sources = []
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("."):
            sources.append(DEPLOY / source)
    return sources


def test_every_file_the_compose_file_names_exists(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "postgres", "tollgate-a", "tollgate-b", "prometheus", "grafana"}
    build = services["tollgate-a"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file()
    for line in (context / build["dockerfile"]).read_text().splitlines():  # what the image copies
        if line.startswith("COPY "):
            for name in line.split()[1:-1]:
                assert (context / name).exists(), name
    for name, service in services.items():
        for source in local_sources(service):
            assert source.exists(), f"{name}: {source}"
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(".")}
    assert named <= set(compose.get("volumes", {}))


@pytest.mark.parametrize("replica", ["tollgate-a", "tollgate-b"])
def test_each_replica_is_the_shipped_proxy_sharing_limits_and_ledger(compose: dict[str, Any], replica: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tollgate = compose["services"][replica]
    [mounted] = [v for v in tollgate["volumes"] if v.endswith("/etc/tollgate/tollgate.toml:ro")]
    path = DEPLOY / mounted.split(":")[0]
    assert tollgate["command"][tollgate["command"].index("-c") + 1] == "/etc/tollgate/tollgate.toml"
    env = tollgate["environment"]
    for name, value in env.items():
        monkeypatch.setenv(name, "x" if "$" in str(value) else str(value))
    config = config_mod.load(path)
    config_mod.check_serve(config_mod.with_workers(config, int(tollgate["command"][-1])))
    assert config.limits.backend == "redis" and config.server.workers == 2
    assert env[config.redis.url_env].startswith("redis://redis:")
    assert config.ledger.backend == "postgresql" and env[config.ledger.dsn_env].startswith("postgresql://")
    assert "@postgres:5432/" in env[config.ledger.dsn_env]
    assert config.server.admin_token_env in env
    assert all(u.api_key_env in env for u in config.upstreams.values() if u.api_key_env)
    assert config.server.data_dir == Path("/data") and f"{replica}:/data" in tollgate["volumes"]
    # Their connections fit the database's (PostgreSQL's default max_connections is 100).
    replicas = [name for name in compose["services"] if name.startswith("tollgate-")]
    assert len(replicas) * config.server.workers * config.ledger.pool_size <= 100 - 3
    # The deployment changes where things are, never what is metered or limited.
    with open(DEPLOY.parent / "config.toml", "rb") as fh:
        shipped = tomllib.load(fh)
    with open(path, "rb") as fh:
        deployed = tomllib.load(fh)
    for key in ("host", "data_dir", "workers"):
        shipped["server"].pop(key, None), deployed["server"].pop(key)
    deployed["limits"].pop("backend"), deployed.pop("redis"), deployed.pop("ledger")
    deployed["upstreams"]["ollama_local"].pop("base_url"), shipped["upstreams"]["ollama_local"].pop("base_url")
    assert deployed == shipped


def test_prometheus_scrapes_the_proxy_with_the_admin_token_and_grafana_has_the_dashboard(
        compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = load_yaml(DEPLOY / "prometheus.yml")
    [job] = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"
    targets = [f"{name}:{services[name]['ports'][0].split(':')[-1]}" for name in ("tollgate-a", "tollgate-b")]
    assert job["static_configs"][0]["targets"] == targets
    token_file = job["authorization"]["credentials_file"]
    assert token_file in " ".join(services["prometheus"]["entrypoint"])  # written from the environment
    assert not any("token" in v for v in services["prometheus"].get("volumes", []))  # never a file here
    provisioning = DEPLOY / "grafana" / "provisioning"
    [source] = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert source["url"] == "http://prometheus:9090"
    [provider] = load_yaml(provisioning / "dashboards" / "tollgate.yaml")["providers"]
    dashboards = [v for v in services["grafana"]["volumes"] if provider["options"]["path"] in v]
    assert dashboards and (DEPLOY / dashboards[0].split(":")[0]).is_file()
    assert os.path.basename(dashboards[0].split(":")[0]) == "tollgate.json"
