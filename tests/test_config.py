"""The shipped config describes the seed's setup; bad configs stop start-up with one clear line."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import typing
from pathlib import Path

import msgspec
import pytest

from proxy import config as config_mod
from proxy import routing
from proxy.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_is_the_seed_setup() -> None:
    config = config_mod.load(ROOT / "config.toml")
    local, cloud = config.upstreams["ollama_local"], config.upstreams["gpt4o_cloud"]
    assert (local.kind, local.base_url, local.free) == ("ollama", "http://127.0.0.1:11434", True)
    assert (cloud.kind, cloud.base_url, cloud.api_key_env) == ("openai", "https://models.github.ai/inference", "GITHUB_TOKEN")
    assert routing.upstream_for(config, "gpt-4o") is cloud and routing.upstream_for(config, "gpt-4o-mini") is cloud
    assert routing.upstream_for(config, "llama3.2") is local
    assert routing.upstream_model(cloud, "gpt-4o") == "openai/gpt-4o"
    assert routing.fallback_for(config, cloud, set(), "openai") is local
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
            decision = limiter.admit_now(limiter.scopes("gpt4o_cloud", model, None), 10)
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


def test_the_readme_config_reference_is_the_schema() -> None:
    """The reference is generated from the schema's own declarations (tools/config_reference.py),
    so a key added, renamed or redocumented without regenerating it fails here."""
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "tools" / "config_reference.py")
    assert spec is not None and spec.loader is not None
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    assert reference.documented((ROOT / "README.md").read_text()) == reference.reference()
    # Every table of the schema has its section.
    tables: set[type[msgspec.Struct]] = set()
    todo: list[type[msgspec.Struct]] = [config_mod.Config]
    while todo:
        for hint in typing.get_type_hints(todo.pop(), include_extras=True).values():
            for kind in [config_mod._unwrap(hint)[0], *typing.get_args(config_mod._unwrap(hint)[0])]:
                if isinstance(kind, type) and issubclass(kind, msgspec.Struct) and kind not in tables:
                    tables.add(kind)
                    todo.append(kind)
    assert tables == {struct for _, struct in reference.SECTIONS}


UP = '[upstreams.a]\nkind = "openai"\nbase_url = "http://x"\n'


@pytest.mark.parametrize("toml, message", [
    (UP + '[upstreams.a.limits]\nrpm = -1', "upstreams.a.limits.rpm = -1: expected a positive whole number"),
    (UP + '[upstreams.a.limits]\nrpm = true', "upstreams.a.limits.rpm = true: expected a positive whole number"),
    ('[upstreams.a]\nkind = "grpc"\nbase_url = "http://x"', "upstreams.a.kind = 'grpc': expected 'openai' or 'ollama'"),
    ('[upstreams.a]\nbase_url = "http://x"', "upstreams.a.kind: missing; expected 'openai' or 'ollama'"),
    ('[upstreams.a]\nkind = "openai"\nbase_url = "ftp://x"', "upstreams.a.base_url = 'ftp://x': expected an http"),
    (UP + 'name = "b"', "upstreams.a.name = 'b': no such key (the name is the table's own"),
    ('[server]\nport = "80"\n' + UP, "server.port = '80': expected a port number from 0 to 65535"),
    ('[server]\nport = 70000\n' + UP, "server.port = 70000: expected a port number from 0 to 65535"),
    ('[stats]\ntimezone = "Mars/Base"\n' + UP, "stats.timezone = 'Mars/Base': expected an IANA time zone"),
    ('[tagging]\nrules = [{type = "chat", pattern = "("}]\n' + UP,
     "tagging.rules[0].pattern = '(': expected a valid regular expression"),
    ('[[alerts.rules]]\nmetric = "cost"\nabove = 1\n' + UP,
     "alerts.rules[0].metric = 'cost': expected 'cost_usd', 'error_rate_pct', "),
    (UP + '[limits.models."gpt-4o*"]\nrpd = 0', 'limits.models."gpt-4o*".rpd = 0: expected a positive whole number'),
    (UP + '[upstreams.b]\nkind = "openai"\nbase_url = "http://y"\nmodels = ["a", 3]',
     "upstreams.b.models = ['a', 3]: expected a list of model names or glob patterns"),
    (UP + 'fallback = "nowhere"', "upstreams.a.fallback = 'nowhere': expected another configured upstream, one of ['a']"),
    ("[upstreams]", "upstreams = {}: expected at least one [upstreams.<name>] table"),
    ("[server]\nhost = ", "not valid TOML"),
    # Misspellings: the nearest key, or the table it belongs in; a whole table is not dumped.
    (UP + '[upstreams.a.limits]\nrmp = 5', "upstreams.a.limits.rmp = 5: no such key; did you mean `rpm`?"),
    (UP + 'rpm = 5', "upstreams.a.rpm = 5: no such key; did you mean `limits.rpm`?"),
    (UP + '[limts.models."gpt-4o"]\nrpm = 5\nrpd = 50\ntpm = 1000', "[limts]: no such table; did you mean `limits`?"),
    (UP + '[server]\nzzz = 1', "server.zzz = 1: no such key (see the README's config reference)"),
])
def test_bad_config_is_one_line_naming_key_value_and_expectation(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith(f"{path}: ")
    assert len(str(info.value)) < len(str(path)) + 160  # one line a person reads, not a dump


def test_cross_key_values_are_worked_out(tmp_path: Path) -> None:
    raw = {"server": {"data_dir": "d", "cors_origins": ["HTTPS://App.Example.org/"]},
           "upstreams": {"o": {"kind": "ollama", "base_url": "http://x/"},
                         "c": {"kind": "openai", "base_url": "http://y", "passthrough": ["/v1/Files*"]}},
           "types": {"doc": {"label": "Documento"}},
           "prices": {"*": {"input": 1.0}}}
    config = config_mod.parse(raw, tmp_path / "config.toml")
    o, c = config.upstreams["o"], config.upstreams["c"]
    assert (o.name, o.label, o.base_url, o.free, o.passthrough) == ("o", "o", "http://x", True,
                                                                     config_mod.OLLAMA_PASSTHROUGH)
    assert (c.free, c.passthrough) == (False, ("/v1/files*",))
    assert config.routing.ollama_upstream == "o"
    assert config.server.data_dir == tmp_path / "d"
    assert config.server.cors_origins == {"https://app.example.org"}
    assert {"localhost", "127.0.0.1", "[::1]"} <= config.server.allowed_hosts
    assert (config.types["doc"].label, config.types["doc"].label_en) == ("Documento", "Documento")
    assert set(config.types) == {"doc", "chat", "vision"}
    assert config.price(c, "m").cost(1000, 0, 500) == 1.0  # cached input priced as input when unset


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
