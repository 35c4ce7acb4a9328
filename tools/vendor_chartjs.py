"""Refresh the Chart.js the dashboard uses, shipped in proxy/static/ from npm's `chart.js` package.

    python tools/vendor_chartjs.py [--version 4.5.1]

The dashboard draws with Chart.js (the seed names it) and loads nothing from outside Tollgate:
this script fetches the package with `npm pack`, keeps its UMD build (one file that defines
`Chart`) and its MIT licence, and records the version and SHA-256 in proxy/static/SOURCE.md,
which a test checks against the file served.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "proxy" / "static"
FILE = "chart.umd.min.js"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="4.5.1")
    version = parser.parse_args().version
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", f"chart.js@{version}"], cwd=tmp, check=True, capture_output=True)
        archive = next(Path(tmp).glob("chart.js-*.tgz"))
        with tarfile.open(archive) as tar:
            code = tar.extractfile(f"package/dist/{FILE}")
            licence = tar.extractfile("package/LICENSE.md")
            assert code is not None and licence is not None
            script, licence_text = code.read(), licence.read().decode()
    OUT.mkdir(exist_ok=True)
    (OUT / FILE).write_bytes(script)
    (OUT / "chart.js.LICENSE.md").write_text(licence_text)
    digest = hashlib.sha256(script).hexdigest()
    (OUT / "SOURCE.md").write_text(
        f"# Vendored files\n\n"
        f"- `{FILE}`: Chart.js {version}, `package/dist/{FILE}` of npm's `chart.js@{version}` "
        f"(MIT, `chart.js.LICENSE.md`), fetched by `tools/vendor_chartjs.py`.\n"
        f"  SHA-256 `{digest}`.\n")
    print(f"chart.js {version}: {len(script):,} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
