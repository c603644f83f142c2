"""The package's layout: no module imports, at any depth (local imports included), one that imports it back;
each layer imports only the layers below it; no function runs over a screen; the command line's parser imports no torch."""

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
    for name in ("config", "data", "students", "train"):
        assert f"sparseinv.distill.{name}" in graph
    for name in ("inversion", "rounds", "demo"):
        assert f"sparseinv.runs.{name}" in graph
    # Only the rounds run calls the inverter; distillation's engine never does.
    for name in (n for n in graph if n.startswith("sparseinv.distill")):
        assert not any(t.startswith("sparseinv.inversion.loop") or t == "sparseinv.inversion" for t in graph[name]), name


def _imports_of(graph: dict[str, set[str]], package: str) -> set[str]:
    """Every sparseinv module the modules of ``package`` import, the package's own aside."""
    inside = {n for n in graph if n == package or n.startswith(package + ".")}
    return set().union(*(graph[n] for n in inside)) - inside


def _within(targets: set[str], *names: str) -> set[str]:
    return {t for t in targets if any(t == n or t.startswith(n + ".") for n in names)}


def test_the_inversion_engine_knows_no_pool_picture_rank_or_run():
    """A batch of labels in, images and kept patches out: pools, grids and ranks are the runs layer's."""
    imported = _imports_of(import_graph(), "sparseinv.inversion")
    assert not _within(imported, "sparseinv.pool", "sparseinv.viz", "sparseinv.distributed", "sparseinv.runs"), imported


def test_only_the_runs_layer_and_the_cli_reach_the_runs_layer():
    graph = import_graph()
    users = {n for n, targets in graph.items() if _within(targets, "sparseinv.runs")}
    # The package's own __init__ names them for the public API (sparseinv.invert).
    assert {u for u in users if u != "sparseinv" and not u.startswith(("sparseinv.runs", "sparseinv.cli"))} == set(), users


def test_the_pool_format_stands_below_the_engine_that_writes_it():
    imported = import_graph()["sparseinv.pool"]
    assert not _within(imported, "sparseinv.inversion", "sparseinv.runs", "sparseinv.distill", "sparseinv.quant"), imported


def test_the_layout_checks_see_a_back_arrow():
    """The rules above read the graph the way an added import would change it."""
    graph = {**import_graph(), "sparseinv.inversion.loop": {"sparseinv.pool"}}
    assert _within(_imports_of(graph, "sparseinv.inversion"), "sparseinv.pool") == {"sparseinv.pool"}


@pytest.mark.parametrize("argv", [["--help"], ["invert", "--help"], ["distill", "--help"], ["quantize"], ["evaluate", "--model"]])
def test_help_and_argument_errors_never_import_torch(argv):
    """`sparseinv --help` and a mistyped command answer at once: torch and timm load only for real work."""
    code = (f"import sys\nfrom sparseinv.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'timm', 'numpy', 'PIL') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADED []" in done.stdout, done.stdout[-500:] + done.stderr[-500:]


def fresh_interpreter_says_ok(code: str) -> None:
    """Run ``code`` where nothing of sparseinv is imported yet; it prints OK when its checks pass."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "OK", done.stderr[-1500:]


def test_every_public_name_and_sub_package_resolves_on_first_use():
    code = ("import sparseinv as s\nassert callable(s.quant.quantize_) and callable(s.inversion.invert_batch)  # never imported by name\n"
            "import sparseinv, sparseinv.quant, sparseinv.distill, sparseinv.inversion\n"
            "import sys\n"
            "for package in (sparseinv, sparseinv.quant, sys.modules['sparseinv.distill'], sparseinv.inversion):\n"
            "    missing = [n for n in package.__all__ if getattr(package, n, None) is None]\n"
            "    assert not missing, (package.__name__, missing)\n"
            "import sparseinv as s\nassert s.quant.quantize_ is s.quantize_ and callable(s.inversion.invert)\n"
            "assert set(s.__all__) <= set(dir(s))\nprint('OK')")
    fresh_interpreter_says_ok(code)


def test_exported_functions_win_over_their_modules_of_the_same_name():
    """`calibrate` is a function and a module of sparseinv.quant; `distill` a function and a sub-package of sparseinv."""
    code = ("import sparseinv.quant.calibrate, sparseinv.quant.reconstruct, sparseinv.distill.train\n"
            "import sparseinv\nfrom sparseinv.quant import calibrate, reconstruct\nfrom sparseinv import distill\n"
            "import types\nassert not any(isinstance(f, types.ModuleType) for f in (calibrate, reconstruct, distill))\n"
            "assert sparseinv.distill is distill and callable(sparseinv.quant.calibrate)\nprint('OK')")
    fresh_interpreter_says_ok(code)


def test_moved_modules_keep_their_old_import_paths():
    """sparseinv.demo, sparseinv.distill.rounds and sparseinv.inversion's run names moved to sparseinv.runs; old imports still work."""
    code = ("from sparseinv.demo import IMAGENETTE, DemoConfig, run_demo\n"
            "from sparseinv.distill.rounds import RoundsConfig, distill_with_rounds, round_folder, ROUND_SEED_OFFSET\n"
            "from sparseinv.distill import RoundsConfig as R2, distill_with_rounds as d2\n"
            "from sparseinv.inversion import invert, InversionResult, run_record, assign_labels\n"
            "from sparseinv import invert as i2, InversionResult as I2\n"
            "import sparseinv.runs.rounds as rounds, sparseinv.runs.inversion as inv, sparseinv.runs.demo as demo\n"
            "assert RoundsConfig is R2 is rounds.RoundsConfig and distill_with_rounds is d2 is rounds.distill_with_rounds\n"
            "assert invert is i2 is inv.invert and InversionResult is I2 and DemoConfig is demo.DemoConfig\n"
            "from sparseinv.export import export_onnx, onnx_session\n"
            "from sparseinv.distill import start_qat, end_qat\n"
            "import sparseinv.quant.export as qe, sparseinv.quant.qat as qat\n"
            "assert export_onnx is qe.export_onnx and start_qat is qat.start_qat and end_qat is qat.end_qat\n"
            "print('OK')")
    fresh_interpreter_says_ok(code)


def test_the_model_layer_stands_below_everything_that_uses_it():
    graph = import_graph()
    layer = {name for name in graph if name == "sparseinv.vit" or name.startswith("sparseinv.vit.")}
    assert {"sparseinv.vit.forward", "sparseinv.vit.views"} <= layer
    below = {"sparseinv.models", "sparseinv.errors", "sparseinv._torchvision_compat", "sparseinv._lazy"}
    for name in layer:
        assert graph[name] <= layer | below, (name, graph[name] - layer - below)
    # Quantization, real-image data and export use the model layer, never the inversion engine.
    users = [n for n in graph if n.startswith("sparseinv.quant") or n == "sparseinv.data"]
    for name in users:
        assert not any(t.startswith("sparseinv.inversion") for t in graph[name]), (name, graph[name])


MAX_FUNCTION_LINES = 80


def long_functions(limit: int = MAX_FUNCTION_LINES) -> dict[tuple[str, str], int]:
    """(module, function) -> lines, for every function or method in the package longer than ``limit``
    (from its ``def`` to its last line: docstring and nested functions count, decorators do not)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("sparseinv", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit:
                found[(module, node.name)] = node.end_lineno - node.lineno + 1
    return found


def test_no_function_runs_over_80_lines():
    over = long_functions()
    assert over == {}, f"split these (lines): {over}"


def test_the_length_check_sees_a_long_function():
    assert ("sparseinv.distill.train", "distill") in long_functions(limit=60)  # 80 lines now, docstring included
    assert long_functions(limit=1)  # every function is over one line
