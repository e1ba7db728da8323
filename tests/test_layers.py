"""The package's layers only look down: utils <- models <- audio <- engine <- (files, weights,
families) <- the apps' parts (cli, web) <- the apps. A module that imports one of a higher layer
fails this test (read from the source, so a lazy import inside a function counts too)."""

import ast
from pathlib import Path

import pytest

import moshi_mlx

ROOT = Path(moshi_mlx.__file__).parent
LAYERS = [  # from the bottom; a module may import its own layer and those below
    ("utils", ["utils"]),
    ("models", ["models"]),
    ("audio", ["audio"]),
    ("engine", ["engine"]),
    ("files and families", ["families", "speech_services", "model_files", "weights"]),
    ("the apps' parts", ["cli", "web"]),  # the flags they share; the servers' web side
    ("apps", ["local", "local_web", "run_inference", "run_helium", "run_tts", "serve"]),
]
LEVEL = {name: level for level, (_, names) in enumerate(LAYERS) for name in names}


def level_of(module: str) -> int | None:
    """The layer of `moshi_mlx.x.y` (by its first part under the package); None for the
    package itself and its attributes (`moshi_mlx.__version__`)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1].startswith("__"):
        return None
    return LEVEL[parts[1]]


def imports(path: Path, module: str) -> set[str]:
    """The moshi_mlx modules (and weights_tools ones) that a source file imports."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in ("moshi_mlx", "weights_tools")}
    return found


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["moshi_mlx", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found.append((".".join(parts), path))
    return found


def test_every_module_has_a_layer():
    assert all(level_of(m) is not None for m, _ in modules() if m != "moshi_mlx")


@pytest.mark.parametrize("module, path", modules(), ids=[m for m, _ in modules()])
def test_a_module_imports_only_its_layer_and_those_below(module, path):
    level = level_of(module)
    if level is None:
        return
    higher = sorted(name for name in imports(path, module)
                    if name.startswith("weights_tools")
                    or (level_of(name) is not None and level_of(name) > level))
    assert not higher, (f"{module} ({LAYERS[level][0]}) imports {higher}: a lower layer must not "
                        "depend on a higher one (the command-line tools in weights_tools sit "
                        "above the package)")


def test_the_check_sees_a_violation(tmp_path):
    """The reader finds relative and absolute imports, also inside functions."""
    source = tmp_path / "worker.py"
    source.write_text("from .. import families\n"
                      "def f():\n    from moshi_mlx.model_files import load_model\n")
    found = imports(source, "moshi_mlx.engine.worker")
    assert found == {"moshi_mlx.families", "moshi_mlx.model_files"}
    assert all(level_of(n) > level_of("moshi_mlx.engine.worker") for n in found)
