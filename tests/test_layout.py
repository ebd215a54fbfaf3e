"""Layout rules. The repository root must not shadow what specdec's dependencies import:
anything run from the root (``python -m pytest``, ``python -m benchmarks.run``,
``python -m tools...``) has the root on ``sys.path`` first, so a top-level folder named
like an installed package replaces it: a top-level ``kernels/`` broke ``import
transformers`` once transformers (5.25) started to import Hugging Face's ``kernels``
package. And tests import the benchmark modules as a package, not through ``sys.path``."""
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _installed_top_level_names() -> set[str]:
    names = set()
    for dist in metadata.distributions():
        top = dist.read_text("top_level.txt")
        if top:
            names.update(n.strip() for n in top.split() if n.strip())
        for f in dist.files or ():
            parts = Path(str(f)).parts
            if len(parts) > 1 and parts[0].isidentifier() and not parts[0].endswith((".dist-info", ".data")):
                names.add(parts[0])
    return names - {"specdec", "tests", "benchmarks"}


def test_no_top_level_folder_shadows_an_installed_package():
    ours = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier() and not p.name.startswith(".")}
    clash = sorted(ours & _installed_top_level_names())
    assert not clash, f"top-level folders {clash} shadow installed packages of the same name; move them"


def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers")
    code = "import transformers.activations, specdec; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_tests_import_scripts_as_packages():
    """Tests import ``benchmarks.<module>`` as a package (the root is on ``sys.path`` under
    ``python -m pytest``), never a script through a ``sys.path`` insert."""
    pattern = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|\+?=)")
    hacks = [f"{f.name}:{i}" for f in sorted((ROOT / "tests").rglob("*.py"))
             for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hacks, f"sys.path changed in {hacks}: import benchmarks.<module> instead"
