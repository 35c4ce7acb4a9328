"""proxy/ stays mypy-strict clean (STYLE.md: typed throughout)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parent.parent


def test_proxy_package_is_mypy_strict_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    out, err, status = api.run(["--config-file", "pyproject.toml", "--no-incremental", "-p", "proxy"])
    assert status == 0, out + err
