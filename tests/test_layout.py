"""The layers of docs/DESIGN.md section 15: every module of tvq imports only from its own
folder and the folders below it, never from a sibling job, and no import cycle exists
(function-level imports count too)."""

import ast
from pathlib import Path

import tvq

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tvq"

# Lower numbers are lower layers; modules of one rank may import each other only inside
# their own folder (jobs never import a sibling job).
RANK = {
    "tvq": 0, "tvq.errors": 0,
    "tvq.config": 1,
    "tvq.text": 2, "tvq.distributed": 2,
    "tvq.nn": 3,
    "tvq.files": 4,
    "tvq.runtime": 5, "tvq.corpus": 5,  # the corpus: text to token shards, read by training
    "tvq.decoding": 6, "tvq.scoring": 6, "tvq.train": 6, "tvq.compression": 6,
    "tvq.batching": 6.5,  # a batch of texts: the decoding loop of tvq.decoding, several rows
    "tvq.serving": 7,  # serves generation and scoring
    "tvq.integrations": 8,
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def home(module: str) -> str:
    """The folder (or top-level module) a module belongs to: its key in RANK."""
    parts = module.split(".")
    return ".".join(parts[:2])


def imports(path: Path) -> set[str]:
    """The tvq modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tvq":
            for alias in node.names:  # `from tvq.files import warm` imports tvq.files.warm
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists()
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tvq"}
    return found


GRAPH = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_folder_has_a_rank():
    assert {home(m) for m in GRAPH} <= set(RANK)


def test_imports_go_down_the_layers():
    climbs = []
    for module, targets in GRAPH.items():
        if module == "tvq":  # the public face re-exports from every layer, lazily
            continue
        for target in targets:
            mine, theirs = home(module), home(target)
            if mine == theirs or target == "tvq":
                continue
            if RANK[theirs] >= RANK[mine]:
                climbs.append(f"{module} -> {target}")
    assert climbs == []


def test_no_import_cycles():
    modules = set(GRAPH)

    def resolve(name: str) -> str:
        while name not in modules:
            name = name.rsplit(".", 1)[0]
        return name

    edges = {
        m: {resolve(t) for t in targets} - {m, "tvq"} for m, targets in GRAPH.items() if m != "tvq"
    }
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, " -> ".join([*path, module])
        if module in done:
            return
        for target in edges.get(module, ()):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])


def test_public_face_resolves():
    """Every name tvq exports is importable from tvq itself."""
    assert sorted(tvq.__all__) == sorted(tvq._EXPORTS)
    for name in tvq.__all__:
        assert getattr(tvq, name) is not None


def test_the_library_never_imports_the_command_line():
    """tvq/ sits below tvqcli/: a front end (the llm plugin too) calls the library."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []  # fmt: skip
            offenders += [f"{module_name(path)} -> {n}" for n in names if n.startswith("tvqcli")]
    assert offenders == []


MODULE_LINES = 400  # a module longer than this says why at its top ("Over N lines ...")
FUNCTION_LINES = 80  # a function body longer than this says why in its docstring


def test_modules_and_functions_are_short_or_say_why():
    """Rooms a newcomer can read: no module over MODULE_LINES lines and no function body
    (its statements, not a command's option declarations) over FUNCTION_LINES without
    its reason at the top, the module's docstring or the function's."""
    long = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "tvqcli").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        where = path.relative_to(ROOT)
        if path.read_text().count("\n") > MODULE_LINES and "lines" not in (
            ast.get_docstring(tree) or ""
        ):
            long.append(f"{where}: {path.read_text().count(chr(10))} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.end_lineno - node.body[0].lineno + 1
                if body > FUNCTION_LINES and "lines" not in (ast.get_docstring(node) or ""):
                    long.append(f"{where}:{node.lineno} {node.name}: {body} lines")
    assert long == []
