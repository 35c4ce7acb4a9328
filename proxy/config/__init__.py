"""`config.toml`: its schema, declared once (`schema.py`), its reading (`reading.py`), and what it
needs of the machine (`environment.py`).

The schema is a tree of frozen msgspec Structs that reject unknown fields. Each key is declared
once, with its type, its constraint, its meaning (the README's reference is generated from it,
`tools/config_reference.py`) and, through the value types below, what an error says it expected.
msgspec does the reading; `explain` turns its errors into one line naming the file, the key, the
bad value and what was expected, with "did you mean" for a misspelt key. What no single key can
say (a fallback naming another upstream, a zone that exists) is checked in `_finish`.

Secrets never enter these objects: the config names the environment variable that holds a
key, and the key is read from the environment at the moment it is sent upstream. So no repr,
log line or traceback of a config object can carry one.
"""

from __future__ import annotations

from .environment import check_bind as check_bind
from .environment import check_serve as check_serve
from .environment import missing_secrets as missing_secrets
from .environment import with_bind as with_bind
from .environment import with_workers as with_workers
from .reading import _unwrap as _unwrap
from .reading import explain as explain
from .reading import load as load
from .reading import parse as parse
from .schema import *  # noqa: F403  (every table and value type is the package's)
