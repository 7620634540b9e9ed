"""The package layout (DESIGN.md "Package layout") is enforced by the import-linter contracts
in pyproject.toml: a lower layer never imports a higher one, siblings stay independent.
Function-level imports count too (import-linter reads every import statement)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True))"


def _lint(src: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LINT, str(config)], cwd=config.parent, capture_output=True,
                          text=True, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_import_contracts_are_kept():
    r = _lint(ROOT / "src", ROOT / "pyproject.toml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """A copy of the package where fixq.numerics imports fixq.app fails the lint, naming the edge."""
    shutil.copytree(ROOT / "src" / "fixq", tmp_path / "src" / "fixq")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    f = tmp_path / "src" / "fixq" / "numerics" / "formats.py"
    f.write_text(f.read_text() + "\n\ndef _upward():\n    from fixq.app import cli  # noqa: F401\n")
    r = _lint(tmp_path / "src", tmp_path / "pyproject.toml")
    assert r.returncode != 0
    assert "fixq.numerics.formats -> fixq.app.cli" in r.stdout, r.stdout


def test_every_module_is_in_a_layer():
    """No module outside the layers (a new top-level module would escape the contract)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in conf["contracts"] if c["type"] == "layers")["layers"]
    named = {p.strip() for layer in layers for p in layer.split("|")}
    pkg = ROOT / "src" / "fixq"
    top = {f"fixq.{p.stem}" for p in pkg.glob("*.py") if p.stem not in ("__init__", "__main__")}
    top |= {f"fixq.{p.name}" for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    assert top == named, f"not in a layer: {sorted(top - named)}; missing: {sorted(named - top)}"
    for p in pkg.iterdir():
        if (p / "__init__.py").is_file():
            doc = (p / "__init__.py").read_text()
            assert doc.startswith('"""') and "import" in doc, f"{p.name}/__init__.py: say what it owns and may import"
