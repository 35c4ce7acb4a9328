"""Request types from the text of a call: each rule reads what its `on` names, in rule order."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy import config as config_mod
from proxy import dialects, tagging

RULES = [{"type": "documento", "on": "system", "pattern": "(?i)documentos"},
         {"type": "presentacion", "on": "last_user", "pattern": "(?i)presentaci[oó]n"},
         {"type": "correccion", "on": "any", "pattern": "(?i)ortograf[ií]a"}]


def _type(system: str, user: str, rules: list[dict[str, Any]] = RULES) -> str:
    config = config_mod.parse({"upstreams": {"local": {"kind": "ollama", "base_url": "http://127.0.0.1:1"}},
                               "types": {"documento": {}, "presentacion": {}, "correccion": {}},
                               "tagging": {"rules": rules}})
    body = orjson.dumps({"model": "m", "messages": [{"role": "system", "content": system},
                                                   {"role": "user", "content": "una presentación antes"},
                                                   {"role": "assistant", "content": "vale"},
                                                   {"role": "user", "content": user}]})
    return tagging.request_type(config, dialects.parse_request("openai", "chat", body), None, None)


@pytest.mark.parametrize("system,user,expected", [
    ("Eres un asistente de documentos.", "hola", "documento"),       # system rule, on the system prompt
    ("Eres un asistente.", "hazme una presentación", "presentacion"),  # last_user rule
    ("Eres un asistente.", "hola", "chat"),                          # an earlier user message does not count
    ("Habla de presentación y documentos", "hola", "documento"),      # last_user rule ignores the system
    ("Eres un asistente.", "mis documentos", "chat"),                 # system rule ignores the user
    ("Cuida la ortografía.", "hola", "correccion"),                  # any: the system prompt
    ("Eres un asistente.", "revisa la ortografia", "correccion"),     # any: the last user message
    ("Cuida la ortografía y los documentos.", "una presentación", "documento"),  # the first rule that matches
])
def test_each_rule_reads_what_it_is_on(system: str, user: str, expected: str) -> None:
    assert _type(system, user) == expected
