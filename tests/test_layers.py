"""The package's stages import only earlier stages (or their own), so data flows one way:

    foundation (errors, metrics, atomic writes, cache places, progress) -> formats -> models -> runtime -> plan -> config ->
    nn / prepare -> train -> export and targets -> eval -> report -> pipeline -> cli

Every import in every module counts, those inside functions too (read from the source's AST)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "qatkit"

STAGES = [
    {"qatkit", "qatkit.metrics", "qatkit.atomic", "qatkit.cache", "qatkit.progress"},
    {"qatkit.formats"},
    {"qatkit.models"},
    {"qatkit.runtime"},
    {"qatkit.plan"},
    {"qatkit.budget"},
    {"qatkit.config"},
    {"qatkit.nn", "qatkit.prepare"},
    {"qatkit.train"},
    {"qatkit.export", "qatkit.targets"},
    {"qatkit.eval", "qatkit.planner"},
    {"qatkit.report"},
    {"qatkit.pipeline", "qatkit.drafter"},
    {"qatkit.cli", "qatkit.__main__", "qatkit.api"},
]


def stage_of(module: str) -> int:
    """The stage of a dotted module name: its longest listed prefix."""
    best, rank = -1, None
    for i, names in enumerate(STAGES):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, rank = len(n), i
    assert rank is not None, f"{module} is in no stage: add it to STAGES"
    return rank


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """qatkit modules imported anywhere in the file, as absolute dotted names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "qatkit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "qatkit":
                continue
            if node.module is None or node.level and not node.module:
                out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x`: x may be a module
            else:
                out.add(mod)
    return out


def test_no_module_imports_a_later_stage():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = module_name(path)
        for dep in sorted(imports(path)):
            if stage_of(dep) > stage_of(me):
                bad.append(f"{me} -> {dep}")
    assert not bad, "imports against the data flow:\n" + "\n".join(bad)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    f = PKG / "train" / "loop.py"
    assert "qatkit.metrics" in imports(f) and "qatkit.runtime.faithful" in imports(f)
    assert stage_of("qatkit.eval.suite") > stage_of("qatkit.targets.gguf") > stage_of("qatkit.train.run") > stage_of("qatkit.runtime.llamacpp")
