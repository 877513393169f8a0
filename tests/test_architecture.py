"""The architecture of ARCHITECTURE.md, checked: the import-linter contracts of pyproject.toml, no import cycle
between moerge's modules, ruff's rules, no class over 400 lines, every package in the wheel, and a runtime that works
without the server's and the plots' extras.

The import checks run on the *installed* layout: adapters/ and routers/ install as moerge.adapters and
moerge.routers through [tool.setuptools.package-dir], and grimp finds a package's modules by walking its folder,
so the folders are copied into that layout in a temporary directory and analysed there, in a subprocess whose
import path starts with it.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
CONFIG = tomllib.loads(PYPROJECT.read_text())["tool"]
SETUPTOOLS = CONFIG["setuptools"]
# package → its folder in the repository, parents before their children
PACKAGE_DIRS = {pkg: ROOT / folder
                for pkg, folder in sorted(SETUPTOOLS["package-dir"].items(), key=lambda kv: kv[0].count("."))}
MAX_CLASS_LINES = 400
# the top-level modules of the server's and the plots' extras (python-multipart is `multipart` or `python_multipart`)
EXTRAS_MODULES = ("fastapi", "uvicorn", "multipart", "python_multipart", "prometheus_client", "xgrammar",
                  "matplotlib")
SUBPROCESS_TIMEOUT = 600  # a guard against a hung child, far above any run's duration


def _source_modules() -> dict[str, Path]:
    """Every module the wheel installs from the package folders: dotted name → file relative to the repository."""
    modules: dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([pkg, *parts])] = path.relative_to(ROOT)
    return modules


SOURCES = _source_modules()


def _run(args: list[str], cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A folder holding moerge as it installs (package-dir applied) and a copy of pyproject.toml."""
    root = tmp_path_factory.mktemp("installed")
    for pkg, folder in PACKAGE_DIRS.items():
        dest = root.joinpath(*pkg.split("."))
        assert not dest.exists(), f"{pkg} is both a folder of its parent package and mapped to {folder}"
        shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(PYPROJECT, root / "pyproject.toml")
    return root


# ---------------------------------------------------------------------------------------------------------------
# (a) the import-linter contracts
# ---------------------------------------------------------------------------------------------------------------
def test_import_linter_contracts(installed):
    """`lint-imports` with the contracts of pyproject.toml passes on the installed layout."""
    run = _run(["-c", "from importlinter.cli import lint_imports_command; lint_imports_command()", "--no-cache"],
               cwd=installed, pythonpath=installed)
    out = run.stdout + run.stderr
    report = out[out.index("Contracts\n"):] if "Contracts\n" in out else out
    assert run.returncode == 0, f"import-linter contracts broken (line numbers are in the files of {ROOT}):\n{report}"


# ---------------------------------------------------------------------------------------------------------------
# (b) no import cycle, imports inside functions included
# ---------------------------------------------------------------------------------------------------------------
GRAPH_SCRIPT = """
import json
import grimp

graph = grimp.build_graph("moerge", cache_dir=None)
edges = []
for importer in sorted(graph.modules):
    for imported in sorted(graph.find_modules_directly_imported_by(importer)):
        details = graph.get_import_details(importer=importer, imported=imported)
        edges.append([importer, imported, sorted({d["line_number"] for d in details})])
print(json.dumps({"modules": sorted(graph.modules), "edges": edges}))
"""


@pytest.fixture(scope="module")
def import_graph(installed) -> dict:
    """grimp's graph of moerge's modules on the installed layout: {"modules": [...], "edges": [[a, b, lines]]}."""
    run = _run(["-c", GRAPH_SCRIPT], cwd=installed, pythonpath=installed)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def strongly_connected(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of the graph ``edges`` (node → the nodes it points to)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in nodes:
        if node not in index:
            visit(node)
    return components


def test_strongly_connected_finds_cycles():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"f"}}
    assert sorted(strongly_connected(list("abcdefg"), edges)) == [["a", "b", "c"], ["d", "e"], ["f"], ["g"]]


def test_graph_covers_the_installed_modules(import_graph):
    """The graph was built on the installed layout: every module of every package folder is in it."""
    missing = sorted(set(SOURCES) - set(import_graph["modules"]))
    assert not missing, f"modules missing from the import graph: {missing}"


def _layer_ranks() -> dict[str, int]:
    """The layers contract's layers as module → rank, 0 at the top (siblings in one layer share a rank)."""
    (contract,) = [c for c in CONFIG["importlinter"]["contracts"] if c["type"] == "layers"]
    (container,) = contract["containers"]
    return {f"{container}.{name.strip()}": rank
            for rank, layer in enumerate(contract["layers"]) for name in layer.replace(":", "|").split("|")}


def _edge_note(importer: str, imported: str, ranks: dict[str, int]) -> str:
    """Why an import inside a cycle is a likely one to remove: it goes up a layer, or back to its own package."""
    def rank(module: str) -> int | None:
        return next((r for layer, r in ranks.items() if module == layer or module.startswith(layer + ".")), None)

    if importer.startswith(imported + "."):
        return "  <- imports its own package's __init__"
    up, down = rank(imported), rank(importer)
    return "  <- upward" if up is not None and down is not None and up < down else ""


def test_no_import_cycles(import_graph):
    """No two moerge modules import each other, directly or through others, counting imports inside functions.

    A package's __init__ may import its own submodules; a submodule importing its package's __init__ back closes a
    cycle and is reported (import the sibling module directly). Each cycle's imports are listed with their lines;
    those that go up a layer or back to the package's __init__ are marked."""
    edges: dict[str, set[str]] = {}
    lines: dict[tuple[str, str], list[int]] = {}
    for importer, imported, numbers in import_graph["edges"]:
        edges.setdefault(importer, set()).add(imported)
        lines[importer, imported] = numbers
    cycles = [c for c in strongly_connected(import_graph["modules"], edges) if len(c) > 1]
    ranks = _layer_ranks()
    report = []
    for component in cycles:
        members = set(component)
        report.append(f"cycle among {len(component)} modules: {', '.join(component)}")
        for importer in component:
            for imported in sorted(edges[importer] & members):
                where = ", ".join(f"{SOURCES.get(importer, importer)}:{n}" for n in lines[importer, imported])
                report.append(f"    {importer} -> {imported}  ({where}){_edge_note(importer, imported, ranks)}")
    assert not cycles, "import cycles:\n" + "\n".join(report)


# ---------------------------------------------------------------------------------------------------------------
# (c) no god objects; (d) every package in the wheel
# ---------------------------------------------------------------------------------------------------------------
def test_ruff_passes():
    """`make lint` (ruff with pyproject.toml's rules) finds nothing: the suite, which CI runs, keeps it so."""
    run = _run(["-m", "ruff", "check", "--no-cache", "moerge", "adapters", "routers", "tests"], cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_class_over_400_lines():
    long = []
    for path in sorted(set(SOURCES.values())):
        for node in ast.walk(ast.parse((ROOT / path).read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long.append(f"{path}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, f"classes over {MAX_CLASS_LINES} lines:\n" + "\n".join(long)


def test_every_package_is_installed():
    """Each folder with an __init__.py under the package folders is listed in [tool.setuptools] packages."""
    packages = {module for module, path in SOURCES.items() if path.name == "__init__.py"}
    missing = sorted(packages - set(SETUPTOOLS["packages"]))
    assert not missing, f"packages missing from [tool.setuptools] packages in pyproject.toml: {missing}"


# ---------------------------------------------------------------------------------------------------------------
# (e) the runtime without the server's and the plots' extras
# ---------------------------------------------------------------------------------------------------------------
RUNTIME_SCRIPT = """
import json
import sys

BLOCKED = set(sys.argv[1].split(","))


class NotInstalled:
    # Reports the extras' packages as missing, as on an install without them.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
for name in BLOCKED:
    try:
        __import__(name)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(f"{name} was not blocked")

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moerge.cli
import moerge.views
from moerge import Expert, ExpertLibrary, LoRAWeights, MoErgeModel

torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                    eos_token_id=2)).eval()
modules = {name: LoRAWeights(torch.randn(4, 32), torch.randn(mod.out_features, 4), 2.0)
           for name, mod in base.named_modules() if name.endswith(("q_proj", "v_proj"))}
lib = ExpertLibrary.create(sys.argv[2], base_model=base)
lib.add(Expert("only", modules))
model = MoErgeModel.from_library(base, lib, router="explicit")
ids = torch.randint(3, 96, (1, 5))
out = model.generate(ids, attention_mask=torch.ones_like(ids), experts=[{"only": 1.0}], max_new_tokens=2,
                     do_sample=False)
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
print(json.dumps({"shape": list(out.shape), "experts": model.last_routing[0].experts, "loaded": loaded}))
"""


def test_runtime_without_server_and_viz_extras(tmp_path, installed):
    """With fastapi, uvicorn, python-multipart and matplotlib missing, moerge (and its CLI and views modules)
    imports, and a tiny model routes a call to a one-expert library and generates."""
    run = _run(["-c", RUNTIME_SCRIPT, ",".join(EXTRAS_MODULES), str(tmp_path / "lib")], cwd=tmp_path,
               pythonpath=installed)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 7]
    assert result["experts"] == pytest.approx({"only": 1.0})
    assert result["loaded"] == []
