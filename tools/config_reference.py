"""The README's config reference, generated from the schema in proxy/config/schema.py.

    python tools/config_reference.py          # rewrite the reference in README.md
    python tools/config_reference.py --check  # exit 1 if README.md differs from the schema

Each section is a Struct of the schema: its docstring, then a row per key with the key's
default and the meaning its `doc(...)` gives. The test suite runs the check.
"""

from __future__ import annotations

import inspect
import sys
import typing
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import config as c  # noqa: E402

BEGIN = "<!-- config reference: generated from proxy/config/schema.py by tools/config_reference.py; do not edit -->"
END = "<!-- end of config reference -->"

SECTIONS: list[tuple[str, type[msgspec.Struct]]] = [
    ("[server]", c.Server),
    ("[ledger]", c.LedgerPolicy),
    ("[stats]", c.Stats),
    ("[routing]", c.Routing),
    ("[upstreams.<name>]", c.Upstream),
    ('[upstreams.<name>.limits]`, `[limits.models."<glob>"]`, `[limits.users."<user>"]`, `[limits.per_user]`, '
     "`[keys.<name>.limits]", c.Limits),
    ("[limits]", c.LimitPolicy),
    ("[redis]", c.RedisPolicy),
    ("[keys.<name>]", c.ProxyKey),
    ("[alerts]", c.AlertPolicy),
    ("[[alerts.rules]]", c.AlertRule),
    ("[alerts.webhooks.<name>]", c.Webhook),
    ("[alerts.email.<name>]", c.Email),
    ("[budgets.<name>]", c.Budget),
    ("[cache]", c.CachePolicy),
    ("[[cache.rules]]", c.CacheRule),
    ("[cache.semantic]", c.SemanticCache),
    ("[commands]", c.Commands),
    ('[prices."<model glob>"]', c.Price),
    ("[types.<name>]", c.RequestType),
    ("[tagging]", c.Tagging),
    ("[[tagging.rules]]", c.TagRule),
]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (str, Path)):
        return '"' + str(value) + '"'
    if isinstance(value, (tuple, list, frozenset)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}"
    raise TypeError(value)


def rows(struct: type[msgspec.Struct]) -> list[tuple[str, str, str]]:
    """(key, default, meaning) of each key the file may set."""
    hints = typing.get_type_hints(struct, include_extras=True)
    out = []
    for f in msgspec.structs.fields(struct):
        metas = c._unwrap(hints[f.name])[1]
        if any(m.extra and m.extra.get("derived") for m in metas):
            continue
        meaning = next((m.description for m in metas if m.description), None)
        said = next((m.extra["default"] for m in metas if m.extra and m.extra.get("default")), None)
        if meaning is None:
            raise SystemExit(f"{struct.__name__}.{f.name} has no doc(...): every key needs a meaning")
        if said is not None:
            default = said
        elif f.required:
            default = "required"
        else:
            default = "`" + _toml(f.default if f.default is not msgspec.NODEFAULT else f.default_factory()) + "`"
        out.append((f.name, default, meaning))
    return out


def reference() -> str:
    parts = [BEGIN]
    for heading, struct in SECTIONS:
        parts += [f"### `{heading}`", "", inspect.cleandoc(struct.__doc__ or ""), "",
                  "| key | default | meaning |", "|---|---|---|"]
        parts += [f"| `{key}` | {default} | {meaning} |" for key, default, meaning in rows(struct)]
        parts.append("")
    parts.append(END)
    return "\n".join(parts)


def documented(readme: str) -> str:
    """The reference as README.md has it now."""
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[start:end]


def main() -> int:
    path = ROOT / "README.md"
    readme = path.read_text()
    if "--check" in sys.argv[1:]:
        if documented(readme) != reference():
            print("README.md's config reference differs from proxy/config/schema.py: run tools/config_reference.py")
            return 1
        return 0
    path.write_text(readme.replace(documented(readme), reference()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
