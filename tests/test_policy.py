"""The house rules, executable (docs/design.md "House rules").

An AST walk over ktnuma/: who may print or write to stderr, which package may import which,
the planner's purity, the worker's import closure (static, and the real one of
`python -S -m ktnuma.worker` read from a subprocess's sys.modules), library messages in
parameter terms, and the docs that must stay true. Every checker takes the package root, and
test_checkers_catch_planted_violations plants one violation per rule in a copy of the tree:
a rule that cannot fail is not a rule.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "ktnuma"

CLI_ENTRIES = ("launch", "release", "cleanup", "inspect", "synth", "bench", "worker", "cli")
CLI_MODULES = {f"ktnuma.{m}" for m in CLI_ENTRIES}
# (module, function) that may write to stderr besides the CLI modules and tools/: the worker's
# entry point, which configures the worker's logging (its stdout is the protocol)
STDERR_FUNCS = {("ktnuma.stage.worker", "main")}
WORKER_BANNED = ("torch", "numpy", "gguf", "safetensors")  # never at import
WORKER_BANNED_ANYWHERE = ("torch", "gguf", "safetensors")  # not even lazily
# package -> packages/modules it must never import (prefix match on dotted names)
FORBIDDEN_IMPORTS: dict[str, tuple[str, ...]] = {
    "ktnuma.index": ("ktnuma.stage", "ktnuma.engine", *sorted(CLI_MODULES)),
    "ktnuma.plan": ("ktnuma.stage", "ktnuma.engine", *sorted(CLI_MODULES), "os"),
    "ktnuma.host": ("ktnuma.stage", "ktnuma.engine", *sorted(CLI_MODULES)),
    "ktnuma.engine": ("ktnuma.integrations",),
}


@dataclass(frozen=True)
class Imp:
    module: str    # the importing module
    target: str    # dotted name imported (for `from a import b`: a.b when a.b is a module, else a)
    line: int
    top: bool      # executed at import time (not inside a function)


def modname(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(root: Path) -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        out[modname(root, p)] = (p, ast.parse(p.read_text(), str(p)))
    return out


def _is_module(name: str, mods: dict) -> bool:
    return name in mods


def imports(mods: dict[str, tuple[Path, ast.Module]]) -> list[Imp]:
    out: list[Imp] = []
    for name, (path, tree) in mods.items():
        is_pkg = path.name == "__init__.py"

        def visit(node: ast.AST, top: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    out.extend(Imp(name, a.name, child.lineno, top) for a in child.names)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:  # relative import
                        pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                        pkg = pkg[: len(pkg) - child.level + 1]
                        base = ".".join(pkg + ([child.module] if child.module else []))
                    for a in child.names:
                        sub = f"{base}.{a.name}"
                        out.append(Imp(name, sub if _is_module(sub, mods) else base, child.lineno, top))
                else:
                    visit(child, inner)

        visit(tree, True)
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# ------------------------------------------------------------------ checkers (root -> problems)

def check_output(root: Path) -> list[str]:
    """print / sys.stderr only in the CLI modules, tools/ and the worker's entry point."""
    bad = []
    for name, (path, tree) in sources(root).items():
        if name in CLI_MODULES or _under(name, "ktnuma.tools"):
            continue
        parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node

        def func_of(node: ast.AST) -> str | None:
            while node in parents:
                node = parents[node]
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    return node.name
            return None

        def is_stderr(node: ast.AST) -> bool:
            return (isinstance(node, ast.Attribute) and node.attr in ("stderr", "__stderr__")
                    and isinstance(node.value, ast.Name) and node.value.id == "sys")

        for node in ast.walk(tree):
            what = None
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Name) and node.func.id == "print":
                what = "print()"
            elif (isinstance(node.func, ast.Attribute) and node.func.attr in ("write", "writelines")
                  and is_stderr(node.func.value)):
                what = "sys.stderr.write()"
            elif any(is_stderr(a) for a in [*node.args, *(k.value for k in node.keywords)]):
                what = "sys.stderr handed to a writer"  # print(file=...), StreamHandler(...), basicConfig(stream=...)
            if what and (name, func_of(node)) not in STDERR_FUNCS:
                bad.append(f"{path.relative_to(root.parent)}:{node.lineno}: {what} outside the CLI and tools/")
    return bad


def check_layers(root: Path) -> list[str]:
    """index/plan/host never import stage/engine/CLI; plan no os; engine no integration;
    the runtime never imports tools/."""
    mods = sources(root)
    bad = []
    for imp in imports(mods):
        for pkg, banned in FORBIDDEN_IMPORTS.items():
            if _under(imp.module, pkg):
                for b in banned:
                    if _under(imp.target, b):
                        bad.append(f"{imp.module}:{imp.line}: imports {imp.target} ({pkg} must not import {b})")
        runtime = not (_under(imp.module, "ktnuma.tools") or imp.module in ("ktnuma.synth", "ktnuma.bench"))
        if runtime and _under(imp.target, "ktnuma.tools"):
            bad.append(f"{imp.module}:{imp.line}: imports {imp.target} (the runtime never imports tools/)")
    return bad


def worker_closure(root: Path) -> tuple[set[str], list[Imp]]:
    """Modules of ktnuma that `import ktnuma.worker` executes, and every import they contain."""
    mods = sources(root)
    by_mod: dict[str, list[Imp]] = {}
    for imp in imports(mods):
        by_mod.setdefault(imp.module, []).append(imp)
    seen: set[str] = set()
    todo = ["ktnuma.worker"]
    while todo:
        m = todo.pop()
        # importing a.b.c runs a/__init__, a/b/__init__ first
        chain = [".".join(m.split(".")[: i + 1]) for i in range(len(m.split(".")))]
        for c in chain:
            if c in mods and c not in seen:
                seen.add(c)
                todo.extend(i.target for i in by_mod.get(c, ()) if i.top and _under(i.target, "ktnuma"))
    return seen, [i for m in seen for i in by_mod.get(m, ())]


def check_worker_static(root: Path) -> list[str]:
    seen, imps = worker_closure(root)
    bad = []
    for i in imps:
        top_name = i.target.split(".")[0]
        if i.top and top_name in WORKER_BANNED:
            bad.append(f"{i.module}:{i.line}: the worker imports {i.target} at import time")
        elif top_name in WORKER_BANNED_ANYWHERE:
            bad.append(f"{i.module}:{i.line}: the worker's closure imports {i.target} (even lazily)")
    return bad


def check_messages(root: Path) -> list[str]:
    """Library messages name parameters (nodes=8), never CLI flags (--nodes 8)."""
    from ktnuma.cli import FLAGS, SWITCHES

    flags = sorted(set(FLAGS.values()) | set(SWITCHES.values()), key=len, reverse=True)
    pat = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, flags)) + r")(?![\w-])")
    bad = []
    for name, (path, tree) in sources(root).items():
        if name in CLI_MODULES or _under(name, "ktnuma.tools"):
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Raise) or (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                                                     and node.func.attr in ("debug", "info", "warning", "error", "exception"))):
                continue
            texts = [s for s in ast.walk(node) if isinstance(s, ast.Constant) and isinstance(s.value, str)]
            if any("python -m ktnuma." in s.value for s in texts):
                continue  # a command line to run: its flags are the CLI's own
            for s in texts:
                if pat.search(s.value):
                    bad.append(f"{path.relative_to(root.parent)}:{s.lineno}: message names the flag "
                               f"{pat.search(s.value).group(1)}; say it in parameter terms (cli.as_flags rewords)")
    return bad


CHECKERS = {"output": check_output, "layers": check_layers, "worker_static": check_worker_static,
            "messages": check_messages}


# ------------------------------------------------------------------ the rules on this tree

# Known violations in other owners' files, listed so that a NEW violation fails at once. Each entry
# is (checker, substring of the problem); remove an entry when its owner fixes it.
KNOWN: tuple[tuple[str, str], ...] = ()  # rules broken on purpose: none


@pytest.mark.parametrize("rule", sorted(CHECKERS))
def test_rule_holds(rule):
    problems = [p for p in CHECKERS[rule](PKG) if not any(r == rule and k in p for r, k in KNOWN)]
    assert problems == [], "\n".join(problems)


def test_worker_real_import_closure():
    """`python -S -m ktnuma.worker` with the coordinator's environment: what is in sys.modules once
    it has started and served (stdin at EOF: it exits at once)."""
    from ktnuma.stage.coordinator import worker_env

    probe = ("import sys, json\n"
             "import ktnuma.worker\n"
             "from ktnuma.stage.worker import main\n"
             "rc = main(['--node', '0', '--real-node', '0', '--cpus', '0'])\n"
             "sys.stdout.write('\\n' + json.dumps(sorted(sys.modules)) + '\\n')\n"
             "sys.exit(rc)\n")
    for flags in (["-S"], []):  # as the coordinator starts it, and with site (numpy/torch importable)
        r = subprocess.run([sys.executable, *flags, "-c", probe], env=worker_env(), capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        loaded = set(json.loads(r.stdout.strip().splitlines()[-1]))
        assert "ktnuma.stage.worker" in loaded and "ktnuma.host.numa" in loaded
        leaked = sorted(m for m in loaded if m.split(".")[0] in WORKER_BANNED)
        assert leaked == [], f"python {' '.join(flags)}: the worker imported {leaked}"
    # and the real command starts cleanly under -S (the closure above is the one it runs)
    r = subprocess.run([sys.executable, "-S", "-X", "importtime", "-m", "ktnuma.worker", "--node", "0",
                        "--real-node", "0", "--cpus", "0"], env=worker_env(), capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and '"op":"ready"' in r.stdout, r.stderr
    timed = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert not sorted(m for m in timed if m.split(".")[0] in WORKER_BANNED)


def test_host_and_stage_init_are_empty():
    for pkg in ("host", "stage"):
        assert (PKG / pkg / "__init__.py").read_text().strip() == "", f"ktnuma/{pkg}/__init__.py"


# ------------------------------------------------------------------ the rules can fail

PLANTS: dict[str, tuple[str, str]] = {  # rule -> (file, line appended)
    "output": ("index/model.py", "print('hello')\n"),
    "layers": ("plan/records.py", "import os\n"),
    "worker_static": ("host/shm.py", "import numpy\n"),
    "messages": ("host/topology.py", "def _planted():\n    raise ValueError('use --nodes 2')\n"),
}
PLANTS_MORE: tuple[tuple[str, str, str], ...] = (
    ("layers", "host/numa.py", "def _planted():\n    from ktnuma.stage import registry\n"),
    ("layers", "engine/attachment.py", "from ktnuma.integrations import kt_kernel\n"),
    ("layers", "stage/manifest.py", "def _planted():\n    from ktnuma.tools import synth\n"),
    ("layers", "index/config.py", "from ktnuma import cli\n"),
    ("output", "stage/registry.py", "import sys\nsys.stderr.write('x')\n"),
    ("output", "engine/views.py", "import logging, sys\nlogging.StreamHandler(sys.stderr)\n"),
    ("messages", "index/naming.py", "import logging\nlogging.getLogger().warning('try --split ep')\n"),
    ("worker_static", "stage/worker.py", "def _planted():\n    import torch\n"),
)


@pytest.mark.parametrize("rule,file,text", [(r, *PLANTS[r]) for r in sorted(PLANTS)] + list(PLANTS_MORE))
def test_checkers_catch_planted_violations(tmp_path, rule, file, text):
    root = tmp_path / "ktnuma"
    shutil.copytree(PKG, root, ignore=shutil.ignore_patterns("__pycache__"))
    before = set(CHECKERS[rule](root))
    with open(root / file, "a") as f:
        f.write("\n" + text)
    after = set(CHECKERS[rule](root)) - before
    assert after, f"{rule}: planting {text!r} in {file} was not caught"
    assert all(file.replace("/", ".").removesuffix(".py") in p or file in p for p in after), after


# ------------------------------------------------------------------ docs that must stay true

def test_every_exception_is_documented_with_its_code():
    import inspect

    import ktnuma.errors as E

    table = (REPO / "docs/errors.md").read_text()
    ours = {n for n, c in vars(E).items() if inspect.isclass(c) and c.__module__ == E.__name__}
    for name, cls in vars(E).items():
        if not (inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == E.__name__):
            continue
        assert cls.__doc__ and cls.__doc__.strip(), f"{name} has no docstring"
        row = re.search(rf"^\| `{name}` \|[^|]*\| ([^|]*) \|", table, re.M)
        assert row, f"docs/errors.md lacks a row for {name}"
        code = getattr(cls, "exit_code", None)
        if code is not None:
            assert str(code) in row.group(1), f"docs/errors.md: {name} exits {code}, the row says {row.group(1)!r}"
            assert f"Exit {code}" in cls.__doc__ or name == "PeerFailed", f"{name}'s docstring does not say Exit {code}"
    # and no exception class lives anywhere else in the package
    for name, (path, tree) in sources(PKG).items():
        if name == "ktnuma.errors":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                    re.search(r"(Error|Exception|Failed|Gone)$", ast.unparse(b))
                    or ast.unparse(b).rsplit(".", 1)[-1] in ours for b in node.bases):
                pytest.fail(f"{path}:{node.lineno}: exception class {node.name} outside ktnuma/errors.py")


@pytest.mark.parametrize("cmd", ["launch", "release", "cleanup", "inspect"])
def test_every_flag_is_documented(cmd):
    r = subprocess.run([sys.executable, "-m", f"ktnuma.{cmd}", "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"}, timeout=60)
    usage = r.stdout.split("\n\n")[0]
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", usage)) - {"--help"}
    doc = (REPO / "docs/cli.md").read_text()
    section = re.search(rf"^## `{cmd}\b.*?(?=^## |\Z)", doc, re.M | re.S)
    assert section, f"docs/cli.md has no section for {cmd}"
    missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){f}(?![\w-])", section.group(0)))
    assert flags and missing == [], f"docs/cli.md ({cmd}) does not document {missing}"


def test_readme_points_at_docs_not_shared():
    text = (REPO / "README.md").read_text()
    assert "../shared" not in text
    assert "docs/README.md" in text
    first = [line for line in text.splitlines() if line.startswith(("bash ", "python3 "))][:2]
    assert first[0].startswith("bash scripts/quickstart") and first[1].startswith("python3 -m pytest -q")


def test_docs_links_resolve_and_every_page_is_indexed():
    pages = sorted((REPO / "docs").glob("*.md"))
    for page in [REPO / "README.md", *pages]:
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.relative_to(REPO)} links {link}, which does not exist"
    index = (REPO / "docs/README.md").read_text()
    unlisted = [p.name for p in pages if p.name != "README.md" and f"]({p.name})" not in index]
    assert unlisted == [], f"docs/README.md does not link {unlisted}"
