"""The project's structure, checked statically or in fresh interpreters (fast, no training):

- no import cycles among the modules of ``trainer``, ``pipelines`` and ``bench`` (every
  import counts: top-level, inside functions, under ``if TYPE_CHECKING:``), with a unit test
  of the cycle finder on synthetic graphs and scratch package trees;
- every CLI (every module that runs as a program is in ``bench.bench_cli_help.CLIS``)
  answers ``--help`` without importing torch, in plain text (no reStructuredText double
  backticks from a docstring);
- ``python -m bench`` runs every ``bench/bench_*.py``;
- the model names of the config are the model zoo's, and ``trainer.table_layout``'s
  state-dict keys are a real model's;
- README's layout section names every module of ``trainer``, ``pipelines`` and ``tools``,
  and only files that exist.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import subprocess
import textwrap
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.bench_cli_help import CLIS  # every CLI of the project (its --help is timed there)
from tests.helpers import PYTHON, ROOT, cli_env

PACKAGES = ("trainer", "pipelines", "bench")


# ---- import graph --------------------------------------------------------------------------


def project_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the packages (``pkg/__init__.py``
    is module ``pkg``)."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imports_in(module: str, path: Path) -> Iterator[tuple[str, list[str], int]]:
    """Every import statement of a module, anywhere in it (top level, functions, ``if
    TYPE_CHECKING:``), as ``(absolute base, imported names or [] for plain import, line)``;
    relative imports are resolved against the module's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            yield base, [alias.name for alias in node.names], node.lineno


def _project_module(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` if it is a project module, else its longest prefix that is one (None: not ours)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, dict[str, str]]:
    """``{module: {imported module: "file:line" of the first such import}}`` among the project's
    modules.

    ``import a.b.c`` imports ``a.b.c`` and executes packages ``a`` and ``a.b`` too;
    ``from a.b import n`` imports ``a.b.n`` where that is a module, else it takes ``n`` from
    package ``a.b`` (an edge to ``a.b``). The implicit edges to the enclosing packages of the
    importing module itself are left out: they are already being imported before the module
    runs (a child never imports its parent package anew), so they close no cycle by
    themselves. An explicit ``from parent import name`` from a child still counts.
    """
    modules = project_modules(root, packages)
    graph: dict[str, dict[str, str]] = {m: {} for m in modules}
    for module, path in modules.items():
        enclosing = {module.rsplit(".", i)[0] for i in range(module.count(".") + 1)}
        where = f"{path.relative_to(root)}"
        for base, names, line in imports_in(module, path):
            wanted = [f"{base}.{n}" if f"{base}.{n}" in modules else base for n in names] if names else [base]
            for name in wanted:
                target = _project_module(name, modules)
                if target is None or target == module:  # not ours, or itself (harmless)
                    continue
                graph[module].setdefault(target, f"{where}:{line}")
                parts = target.split(".")
                for i in range(1, len(parts)):
                    ancestor = ".".join(parts[:i])
                    if ancestor in modules and ancestor not in enclosing:
                        graph[module].setdefault(ancestor, f"{where}:{line}")
    return graph


def find_cycle(graph: dict[str, Iterable[str]]) -> list[str] | None:
    """One cycle of a directed graph as ``[a, b, ..., a]`` (deterministic), or None."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    for start in sorted(graph):
        if color[start] != white:
            continue
        color[start] = grey
        path = [start]
        stack = [iter(sorted(graph[start]))]
        while stack:
            for child in stack[-1]:
                state = color.get(child, black)  # a node with no entry has no edges
                if state == grey:
                    return path[path.index(child):] + [child]
                if state == white:
                    color[child] = grey
                    path.append(child)
                    stack.append(iter(sorted(graph[child])))
                    break
            else:
                color[path.pop()] = black
                stack.pop()
    return None


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, str]]) -> str:
    return "\n".join(f"  {a} imports {b}  ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


def test_no_import_cycles_among_the_project_modules():
    graph = import_graph(ROOT)
    assert len(graph) > 20 and "trainer.main" in graph and "pipelines.run" in graph and "bench" in graph
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle {' -> '.join(cycle)}:\n{describe_cycle(cycle, graph)}"


def test_cycle_finder_on_synthetic_graphs():
    assert find_cycle({}) is None
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None
    assert find_cycle({"a": ["a"]}) == ["a", "a"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": ["y"], "y": ["z"], "z": ["y"]}) == ["y", "z", "y"]
    assert find_cycle({"a": ["b", "zz"], "b": []}) is None  # edges to nodes without an entry: leaves


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def _cycle(root: Path, packages=("pkg", "other")) -> list[str] | None:
    return find_cycle(import_graph(root, [p for p in packages if (root / p).exists()]))


def test_import_graph_counts_every_kind_of_import(tmp_path):
    # children importing siblings through their re-exporting parent package: no cycle
    base = {
        "pkg/__init__.py": "from pkg.core import Thing\n",
        "pkg/core.py": "import pkg.util\nfrom pkg import util\nfrom . import util as u\n\nclass Thing: ...\n",
        "pkg/util.py": "import os\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/x.py": "from ..util import os\n",
    }
    assert _cycle(_tree(tmp_path / "ok", base)) is None
    graph = import_graph(tmp_path / "ok", ["pkg"])
    assert set(graph["pkg.core"]) == {"pkg.util"}
    assert set(graph["pkg.sub.x"]) == {"pkg.util"}  # relative, two levels up
    assert set(graph["pkg"]) == {"pkg.core"}

    cases = {
        "function-level import": {"pkg/util.py": "def f():\n    from pkg.core import Thing\n"},
        "TYPE_CHECKING import": {
            "pkg/util.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .core import Thing\n"
        },
        "relative import two levels up": {
            "pkg/util.py": "from pkg.sub import x\n",
            "pkg/sub/x.py": "from .. import core\n",
        },
        "name taken from the parent package": {"pkg/util.py": "from pkg import Thing\n"},
        "a package's __init__ run by a submodule import": {
            "pkg/util.py": "import other.leaf\n",
            "other/__init__.py": "from other.m import f\n",
            "other/m.py": "import pkg.core\ndef f(): ...\n",
            "other/leaf.py": "",
        },
    }
    for what, files in cases.items():
        root = _tree(tmp_path / what.replace(" ", "_"), {**base, **files})
        assert _cycle(root) is not None, f"{what}: cycle not found"


# ---- CLIs answer --help without torch ----------------------------------------------------------


HELP_SCRIPT = """\
import json, runpy, sys
MOD = sys.argv[1]
sys.argv = [MOD, "--help"]
code = None
try:
    runpy.run_module(MOD, run_name="__main__")
except SystemExit as e:
    code = e.code
sys.stdout.flush()
print("\\n@@result " + json.dumps({"exit": code if code is None or isinstance(code, int) else str(code),
    "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}))
"""


def _help_problems(module: str) -> list[str]:
    """What is wrong with ``python -m MODULE --help`` in a fresh interpreter (empty: nothing)."""
    proc = subprocess.run([PYTHON, "-c", HELP_SCRIPT, module], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    out, _, tail = proc.stdout.rpartition("\n@@result ")
    if proc.returncode != 0 or not tail:
        return [f"the interpreter failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}"]
    result = json.loads(tail)
    problems = []
    if result["exit"] not in (0, None):
        problems.append(f"exit {result['exit']}: {proc.stderr.strip()[-800:]}")
    if "usage" not in out.lower():
        problems.append(f"no usage text printed (stdout: {out.strip()[-300:]!r})")
    if result["torch"]:
        problems.append(f"imports torch ({len(result['torch'])} torch modules loaded)")
    if "``" in out:
        problems.append("raw reStructuredText in the help: " + "; ".join(line.strip() for line in out.splitlines() if "``" in line))
    return problems


def test_every_cli_of_the_project_is_checked():
    """A module that runs as a program (``if __name__ == "__main__":``, or a package's
    ``__main__.py``) is in ``CLIS``, so its ``--help`` is checked below and timed."""
    programs = set()
    for module, path in project_modules(ROOT).items():
        if module.endswith(".__main__"):
            programs.add(module.removesuffix(".__main__"))
        elif 'if __name__ == "__main__":' in path.read_text():
            programs.add(module)
    assert {"trainer.main", "bench", "bench.bench_loader"} <= programs
    assert sorted(programs - set(CLIS)) == [], "CLIs missing from bench.bench_cli_help.CLIS"
    assert sorted(set(CLIS) - programs) == [], "not CLIs, yet in bench.bench_cli_help.CLIS"


@pytest.fixture(scope="module")
def help_results() -> dict[str, list[str]]:
    """Every CLI's ``--help``, each in its own interpreter, two at a time."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CLIS, pool.map(_help_problems, CLIS)))


@pytest.mark.parametrize("module", CLIS)
def test_cli_help_answers_without_importing_torch(module, help_results):
    failing = sorted(m for m, problems in help_results.items() if problems)
    problems = help_results[module]
    assert not problems, f"python -m {module} --help: {'; '.join(problems)}  [CLIs failing this check: {', '.join(failing)}]"


# ---- names shared between modules -------------------------------------------------------------


def test_python_m_bench_runs_every_benchmark():
    from bench.__main__ import BENCHMARKS, STUDIES

    modules = {f"bench.{path.stem}" for path in (ROOT / "bench").glob("bench_*.py")}
    assert len(modules) > 10
    assert sorted(modules - {*BENCHMARKS, *STUDIES}) == [], "benchmarks missing from bench/__main__.py (BENCHMARKS or STUDIES)"
    assert sorted({*BENCHMARKS, *STUDIES} - modules) == [], "bench/__main__.py names benchmarks that do not exist"


def test_config_model_names_are_the_model_zoo():
    from trainer.job_config import MODEL_NAMES
    from trainer.model.interactions import INTERACTIONS

    assert set(MODEL_NAMES) == set(INTERACTIONS)


@pytest.mark.parametrize("mode", ["se", "me"])
def test_table_layout_keys_are_the_models_state_dict_keys(mode):
    from trainer.data.schema import SparseField
    from trainer.job_config import EmbeddingConfig, ModelConfig
    from trainer.model import MultiEmbeddingCTR, TrainModule
    from trainer.table_layout import checkpoint_weight_key, embedding_shape, model_weight_key

    fields = [SparseField("a", 5), SparseField("b", 7), SparseField("c", 3)]
    model = MultiEmbeddingCTR.from_config(fields, ModelConfig(name="dcnv2", hidden=8), EmbeddingConfig(mode, 2, base_dim=4), seed=0)
    num_sets, _ = embedding_shape(mode, 2, 4)
    checkpoint_keys = {"model." + k for k in TrainModule(model).state_dict()}
    model_keys = set(model.state_dict())
    for m in range(num_sets):
        for field in fields:
            assert checkpoint_weight_key(m, field.name) in checkpoint_keys, (m, field.name, sorted(checkpoint_keys)[:5])
            assert model_weight_key(m, field.name) in model_keys, (m, field.name, sorted(model_keys)[:5])


# ---- README's layout section and the tree ------------------------------------------------------

LAYOUT_PACKAGES = ("trainer", "pipelines", "tools")


def layout_entries(readme: str) -> list[str]:
    """The paths of README's layout block: two spaces of indent per level below a ``dir/``
    line (``model/`` then ``  heads.py`` is ``model/heads.py``); a name may be a glob."""
    block = readme.split("\n## Layout\n", 1)[1].split("```\n", 2)[1]
    entries: list[str] = []
    parents: list[str] = []
    for line in block.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        parents = parents[:depth]
        entries.append("".join(parents) + name)
        if name.endswith("/"):
            parents.append(name)
    return entries


def test_layout_entries_follow_the_indentation():
    readme = "x\n## Layout\n\ntext\n```\na/   a dir\n  b.py  b\n  c/\n    d/*.py  ds\ne.py  e\n```\nmore\n"
    assert layout_entries(readme) == ["a/", "a/b.py", "a/c/", "a/c/d/*.py", "e.py"]


def test_readme_layout_lists_every_module_and_only_real_files():
    files = [e for e in layout_entries((ROOT / "README.md").read_text()) if not e.endswith("/")]
    modules = sorted(
        str(path.relative_to(ROOT)) for package in LAYOUT_PACKAGES
        for path in (ROOT / package).rglob("*.py") if path.name != "__init__.py"
    )  # fmt: skip
    assert len(modules) > 40 and "trainer/main.py" in files
    unlisted = [m for m in modules if not any(fnmatch.fnmatch(m, f) for f in files)]
    assert unlisted == [], "modules missing from README's layout section (one line each, saying what it owns)"
    missing = [f for f in files if not any(ROOT.glob(f))]
    assert missing == [], "README's layout section names files that do not exist"
