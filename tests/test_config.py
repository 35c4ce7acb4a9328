"""The shipped config describes the seed's setup; bad configs stop start-up with one clear line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_is_the_seed_setup() -> None:
    config = config_mod.load(ROOT / "config.toml")
    local, cloud = config.upstreams["ollama_local"], config.upstreams["gpt4o_cloud"]
    assert (local.kind, local.base_url, local.free) == ("ollama", "http://127.0.0.1:11434", True)
    assert (cloud.kind, cloud.base_url, cloud.api_key_env) == ("openai", "https://models.github.ai/inference", "GITHUB_TOKEN")
    assert config.upstream_for("gpt-4o") is cloud and config.upstream_for("gpt-4o-mini") is cloud
    assert config.upstream_for("llama3.2") is local
    assert cloud.upstream_model("gpt-4o") == "openai/gpt-4o"
    assert set(config.types) == {"chat", "presentacion", "documento", "hoja_calculo", "web_scraping",
                                 "correccion", "vision"}
    price = config.price(cloud, "gpt-4o")
    assert (price.input, price.output) == (0.03, 0.06)
    assert config.price(local, "llama3.2").cost(1000, 1000, 0) == 0
    assert (config.server.host, config.server.port) == ("127.0.0.1", 5000)
    # The seed's TPM on the upstream; GitHub's published free limits per model tier.
    assert (cloud.limits.rpm, cloud.limits.rpd, cloud.limits.tpm) == (None, None, 150000)
    high, low = config.limits.models["*gpt-4o"], config.limits.models["*gpt-4o-mini"]
    assert (high.rpm, high.rpd, high.concurrency, high.max_input_tokens, high.max_output_tokens) == (10, 50, 2, 8000, 4000)
    assert (low.rpm, low.rpd, low.concurrency, low.max_input_tokens, low.max_output_tokens) == (15, 150, 5, 8000, 4000)


def test_shipped_config_limits_each_model_by_its_tier_and_the_seed_strings_describe_gpt4o() -> None:
    from proxy.limits import Denial, Limiter, Ticket
    from proxy.stats import rate_limits

    config = config_mod.load(ROOT / "config.toml")
    now = [1_700_000_000.0]
    limiter = Limiter(config, lambda: now[0])
    for model, per_day in (("gpt-4o", 50), ("openai/gpt-4o", 0), ("gpt-4o-mini", 150)):
        admitted = 0
        for _ in range(200):
            now[0] += 7  # under every per-minute limit
            decision = limiter.admit(limiter.scopes("gpt4o_cloud", model, None), 10)
            if isinstance(decision, Denial):
                assert decision.limit == "requests_per_day"
                break
            assert isinstance(decision, Ticket)
            limiter.finish(decision, 10)
            admitted += 1
        # "openai/gpt-4o" is the same model: gpt-4o's 50 were already spent.
        assert admitted == per_day, model
    assert rate_limits(config, limiter)["requests_dia"] == "50 / 50 RPD"
    assert rate_limits(config, limiter)["tokens_pm"].endswith(" / 150,000 TPM")


def _readme_keys() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Configuration"):text.index("## Development")]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))


def _parser_keys() -> set[str]:
    source = (ROOT / "proxy" / "config.py").read_text()
    return set(re.findall(r'(?:\.(?:get|opt|positive|limit|sub)\(|_env_name\(\w+, )"([a-z_]+)"', source))


def test_every_config_key_is_documented() -> None:
    # Tables are documented as README sections; every other key the parser reads has a row.
    tables = {"server", "stats", "routing", "upstreams", "types", "prices", "tagging", "limits", "keys",
              "alerts", "commands"}
    assert _parser_keys() - tables - _readme_keys() == set()
    assert _readme_keys() - _parser_keys() == set()


@pytest.mark.parametrize("toml, message", [
    ('[upstreams.a]\nkind = "openai"\nbase_url = "http://x"\n[upstreams.a.limits]\nrpm = -1',
     "upstreams.a.limits.rpm = -1: expected a positive whole number"),
    ('[upstreams.a]\nkind = "grpc"\nbase_url = "http://x"', "upstreams.a.kind = 'grpc': expected 'openai' or 'ollama'"),
    ('[upstreams.a]\nkind = "openai"\nbase_url = "ftp://x"', "upstreams.a.base_url = 'ftp://x': expected an http"),
    ('[upstreams.a]\nkind = "openai"\nbase_url = "http://x"\nrpm = 5', "upstreams.a.rpm = 5: expected no such key"),
    ('[server]\nport = "80"\n[upstreams.a]\nkind = "openai"\nbase_url = "http://x"', "server.port = '80': expected a port number"),
    ('[stats]\ntimezone = "Mars/Base"\n[upstreams.a]\nkind = "openai"\nbase_url = "http://x"', "stats.timezone = 'Mars/Base'"),
    ('[tagging]\nrules = [{type = "chat", pattern = "("}]\n[upstreams.a]\nkind = "openai"\nbase_url = "http://x"',
     "tagging.rules[0].pattern = '(': expected a valid regular expression"),
    ("[server]\nhost = ", "not valid TOML"),
])
def test_bad_config_is_one_line_naming_key_value_and_expectation(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_bad_config_stops_the_command_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[upstreams.a]\nkind = "openai"\nbase_url = "http://x"\n[upstreams.a.limits]\nrpd = 0\n')
    proc = subprocess.run([sys.executable, "-m", "proxy", "-c", str(path), "serve"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"tollgate: config error: {path}: upstreams.a.limits.rpd = 0: expected a positive whole number "
        "(omit the key for no limit)"]


def test_non_loopback_bind_needs_an_admin_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {"server": {"host": "0.0.0.0", "admin_token_env": "TG_TEST_ADMIN"},
           "upstreams": {"a": {"kind": "openai", "base_url": "http://x"}}}
    monkeypatch.delenv("TG_TEST_ADMIN", raising=False)
    with pytest.raises(ConfigError, match="non-loopback address needs an admin token"):
        config_mod.check_bind(config_mod.parse(raw))
    monkeypatch.setenv("TG_TEST_ADMIN", "s3cret")
    config_mod.check_bind(config_mod.parse(raw))


def test_config_repr_holds_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_should_never_show")
    config = config_mod.load(ROOT / "config.toml")
    assert config.upstreams["gpt4o_cloud"].api_key() == "ghp_should_never_show"
    assert "ghp_should_never_show" not in repr(config)


def test_the_readme_security_table_names_real_tests() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Security"):text.index("## Command line")]
    named = re.findall(r"`(test_[a-z_]+\.py)(?:::(test_[a-z0-9_]+))?`", section)
    assert len(named) >= 15
    for module, test in named:
        source = (ROOT / "tests" / module).read_text()
        assert not test or re.search(rf"def {test}\(", source), f"{module}::{test}"
