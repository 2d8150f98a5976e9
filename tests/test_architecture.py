"""The layers of docs/ARCHITECTURE.md point down only: a module never imports one of a higher layer, not even
inside a function (an import hidden in a function to dodge the rule is the rule broken)."""

from __future__ import annotations

import ast

from conftest import REPO

# Lowest first. A module may import its own layer and the layers before it.
LAYERS = ["utils", "utils.data", "utils.tokenization", "utils.examples", "model", "model.training",
          "model.inference", "model.serving", "model.gguf", "model.evaluation"]
STAGES = {path.stem for path in REPO.glob("*.py")}


def layer(module: str) -> int | None:
    """Index in LAYERS (the longest matching prefix); len(LAYERS) for a stage script; None for libraries."""
    if module.split(".")[0] in STAGES:
        return len(LAYERS)
    matches = [i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")]
    return max(matches, key=lambda i: len(LAYERS[i])) if matches else None


def imports(path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names  # `from model import build`
                      if node.module in ("utils", "model")]
    return found


def test_layers_import_only_downwards():
    modules = sorted(p for top in ("utils", "model") for p in (REPO / top).rglob("*.py"))
    assert len(modules) > 20
    # every package of the core is a layer of its own (a new one must be placed in LAYERS, not fall into its parent)
    packages = {".".join(p.parent.relative_to(REPO).parts) for p in modules}
    assert packages <= set(LAYERS), f"packages missing from LAYERS: {sorted(packages - set(LAYERS))}"
    upward = []
    for path in modules:
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        own = layer(name)
        for line, target in imports(path):
            theirs = layer(target)
            if theirs is not None and theirs > own:
                upward.append(f"{path.relative_to(REPO)}:{line} ({LAYERS[own]}) imports {target}")
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The check itself: a data module importing the trainer, even inside a function, is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from model.training.trainer import save_final\n")
    assert [layer(target) for _, target in imports(bad)] == [LAYERS.index("model.training")]
    assert layer("utils.data.sources") < layer("utils.tokenization.chat_format") < layer("model.build")
    # the HTTP adapter sits on the inference service; inference never imports it
    assert layer("model.inference.service") < layer("model.serving.app") < layer("serve")
    bad.write_text("from model.serving.schema import APIError\n")
    assert [layer(target) for _, target in imports(bad)] == [LAYERS.index("model.serving")]
    assert layer("pre_train") == len(LAYERS) and layer("torch") is None


def test_no_module_shadows_an_installed_package_or_a_sibling():
    """A script at the root is importable by its name from anything run there (`python eval_model.py` puts the
    root first on sys.path): named like an installed package, it would replace that package for every library
    that imports it (evaluate.py did, for Hugging Face's `evaluate`). And a library module named like a stage
    script (model/export.py beside export.py) makes two homes for one word."""
    import importlib.metadata

    installed = set(importlib.metadata.packages_distributions())
    assert "transformers" in installed
    assert sorted(STAGES & installed) == []
    libraries = {p.stem for top in ("utils", "model") for p in (REPO / top).rglob("*.py")} - {"__init__"}
    assert sorted(STAGES & libraries) == []


def test_the_tree_is_ruff_clean():
    """`make lint` as a test, so CI holds the rule set of pyproject.toml: ruff reads its configuration there."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
