"""The package's layout: no module imports, at any depth (local imports included), one that imports it back; the command line's parser imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import sparseinv

PACKAGE = Path(sparseinv.__file__).resolve().parent


def import_graph() -> dict[str, set[str]]:
    """Module -> the sparseinv modules it imports anywhere in its source (a package's own __init__ aside)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("sparseinv", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        modules[name] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            # A submodule importing its parent package only reaches names the parent re-exports.
            graph[name] |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_subpackages_hold_their_concepts():
    graph = import_graph()
    for name in ("config", "loop", "sparse_forward", "kept_pixels", "losses", "augment", "schedule", "precision"):
        assert f"sparseinv.inversion.{name}" in graph
    for name in ("config", "data", "students", "train", "rounds"):
        assert f"sparseinv.distill.{name}" in graph
    # Only the rounds loop calls the inverter; the training loop never does.
    assert not any(t.startswith("sparseinv.inversion.loop") or t == "sparseinv.inversion" for t in graph["sparseinv.distill.train"])


@pytest.mark.parametrize("argv", [["--help"], ["invert", "--help"], ["distill", "--help"], ["quantize"], ["evaluate", "--model"]])
def test_help_and_argument_errors_never_import_torch(argv):
    """`sparseinv --help` and a mistyped command answer at once: torch and timm load only for real work."""
    code = (f"import sys\nfrom sparseinv.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'timm', 'numpy', 'PIL') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADED []" in done.stdout, done.stdout[-500:] + done.stderr[-500:]


def test_every_public_name_and_sub_package_resolves_on_first_use():
    code = ("import sparseinv as s\nassert callable(s.quant.quantize_) and callable(s.inversion.invert_batch)  # never imported by name\n"
            "import sparseinv, sparseinv.quant, sparseinv.distill, sparseinv.inversion\n"
            "import sys\n"
            "for package in (sparseinv, sparseinv.quant, sys.modules['sparseinv.distill'], sparseinv.inversion):\n"
            "    missing = [n for n in package.__all__ if getattr(package, n, None) is None]\n"
            "    assert not missing, (package.__name__, missing)\n"
            "import sparseinv as s\nassert s.quant.quantize_ is s.quantize_ and callable(s.inversion.invert)\n"
            "assert set(s.__all__) <= set(dir(s))\nprint('OK')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "OK", done.stderr[-1500:]


def test_exported_functions_win_over_their_modules_of_the_same_name():
    """`calibrate` is a function and a module of sparseinv.quant; `distill` a function and a sub-package of sparseinv."""
    code = ("import sparseinv.quant.calibrate, sparseinv.quant.reconstruct, sparseinv.distill.train\n"
            "import sparseinv\nfrom sparseinv.quant import calibrate, reconstruct\nfrom sparseinv import distill\n"
            "import types\nassert not any(isinstance(f, types.ModuleType) for f in (calibrate, reconstruct, distill))\n"
            "assert sparseinv.distill is distill and callable(sparseinv.quant.calibrate)\nprint('OK')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "OK", done.stderr[-1500:]


def test_the_model_layer_stands_below_everything_that_uses_it():
    graph = import_graph()
    layer = {name for name in graph if name == "sparseinv.vit" or name.startswith("sparseinv.vit.")}
    assert {"sparseinv.vit.forward", "sparseinv.vit.views"} <= layer
    below = {"sparseinv.models", "sparseinv.errors", "sparseinv._torchvision_compat", "sparseinv._lazy"}
    for name in layer:
        assert graph[name] <= layer | below, (name, graph[name] - layer - below)
    # Quantization, real-image data and export use the model layer, never the inversion engine.
    users = [n for n in graph if n.startswith("sparseinv.quant") or n in ("sparseinv.data", "sparseinv.export")]
    for name in users:
        assert not any(t.startswith("sparseinv.inversion") for t in graph[name]), (name, graph[name])
