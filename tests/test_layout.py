"""The library stands apart from the zoo: no library module imports the zoo, its judges, its
defence table or its demo, so that `sau_kernels` works on a real checkpoint with the zoo
left out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sau_kernels

PACKAGE = Path(sau_kernels.__file__).parent


def library_modules() -> list[str]:
    """Every module of the package but the zoo's and the command-line applications'."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] == "zoo" or parts[-1] in ("cli", "__main__"):
            continue
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        names.append(".".join(("sau_kernels",) + parts))
    return names


CHECK = """
import importlib, json, sys
imported, skipped = [], []
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
        imported.append(name)
    except ModuleNotFoundError as e:  # an optional dependency (triton, ray) that is not installed
        if (e.name or "").startswith("sau_kernels"):
            raise
        skipped.append(name)
zoo = sorted(m for m in sys.modules if m == "sau_kernels.zoo" or m.startswith("sau_kernels.zoo."))
print(json.dumps({"imported": imported, "skipped": skipped, "zoo": zoo}))
"""


def test_library_modules_import_nothing_from_the_zoo():
    modules = library_modules()
    assert {"sau_kernels", "sau_kernels.calibrate", "sau_kernels.pipeline", "sau_kernels.ops"} <= set(modules)
    r = subprocess.run([sys.executable, "-c", CHECK, json.dumps(modules)], capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["zoo"] == [], f"library modules imported {result['zoo']}"
    assert "sau_kernels.calibrate" in result["imported"] and "sau_kernels.pipeline" in result["imported"]


def test_zoo_helpers_live_in_the_zoo():
    for gone in ("metrics", "evaluation", "demo"):
        assert not (PACKAGE / f"{gone}.py").exists()
        assert (PACKAGE / "zoo" / f"{gone}.py").is_file()
