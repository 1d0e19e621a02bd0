"""Dependency boundaries: card/errors ← runtime ← training ← export, CLI on top.

Checked twice: statically (no forbidden import anywhere in a stage's source, even
inside functions) and dynamically (what a fresh interpreter really loads).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, Trained

HEAVY = {"torch", "torchvision", "timm", "onnx", "onnxscript", "onnxruntime", "tensorrt"}
STDLIB_ONLY = ("edgedx/card.py", "edgedx/errors.py", "edgedx/progress.py")


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_runtime_source_never_imports_torch_or_onnx() -> None:
    for path in (ROOT / "runtime").rglob("*.py"):
        bad = imported_roots(path) & {"torch", "torchvision", "timm", "onnx", "onnxscript"}
        assert not bad, f"{path.name} imports {bad}"


def test_training_source_never_imports_onnxruntime_or_export() -> None:
    for path in (ROOT / "training").rglob("*.py"):
        roots = imported_roots(path)
        assert "onnxruntime" not in roots and "onnx" not in roots, path.name
        assert "edgedx.export" not in path.read_text(), path.name


def test_card_and_errors_are_standard_library_only() -> None:
    allowed = set(sys.stdlib_module_names) | {"edgedx"}
    for rel in STDLIB_ONLY:
        extra = imported_roots(ROOT / rel) - allowed
        assert not extra, f"{rel} imports {extra}"


def loaded_after(code: str) -> set[str]:
    """Top-level modules present in a fresh interpreter after running ``code``."""
    script = code + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_importing_every_runtime_module_loads_no_torch_or_onnx() -> None:
    modules = sorted(
        "edgedx.runtime." + ".".join(p.relative_to(ROOT / "runtime").with_suffix("").parts)
        for p in (ROOT / "runtime").rglob("*.py") if p.stem != "__init__"
    )
    assert "edgedx.runtime.backends.session" in modules and "edgedx.runtime.outputs.records" in modules
    loaded = loaded_after("import " + ", ".join(["edgedx.runtime", *modules]))
    assert not loaded & {"torch", "timm", "onnx", "torchvision", "onnxscript"}


def test_help_loads_neither_torch_nor_onnxruntime() -> None:
    loaded = loaded_after(
        "import sys\nfrom edgedx.cli import main\nsys.argv = ['edgedx', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass"
    )
    assert "edgedx" in loaded
    assert not loaded & {"torch", "onnxruntime", "onnx", "timm"}


def test_training_loads_no_onnxruntime() -> None:
    pytest.importorskip("torch")
    loaded = loaded_after("import edgedx.training.train, edgedx.training.checkpoint, edgedx.training.models")
    assert "torch" in loaded and "onnxruntime" not in loaded


def test_diagnose_end_to_end_loads_no_torch(trained: Trained, tmp_path: Path) -> None:
    images = sorted((trained.data / "parasitized").glob("*.png"))[:3]
    args = ["edgedx", "diagnose", *map(str, images), "--model", str(trained.onnx), "--out", str(tmp_path / "o.jsonl")]
    loaded = loaded_after(
        f"import sys\nfrom edgedx.cli import main\nsys.argv = {args!r}\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code"
    )
    assert "onnxruntime" in loaded  # it really ran the model
    assert not loaded & {"torch", "onnx", "timm", "torchvision"}
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [("edgedx.training.train", "torch", "train"), ("edgedx.export.pipeline", "onnx", "export"), ("edgedx.export.pipeline", "torch", "export")],
)
def test_missing_optional_package_names_the_extra(module: str, blocked: str, extra: str) -> None:
    """Without an extra, the command fails with the pip line to run, not an ImportError."""
    script = (
        f"import sys\nsys.modules[{blocked!r}] = None\n"
        "from edgedx.errors import MissingDependencyError\n"
        f"try:\n    import {module}\nexcept MissingDependencyError as exc:\n    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"pip install 'edgedx[{extra}]'" in proc.stdout and f"'{blocked}'" in proc.stdout


def test_no_function_over_80_lines() -> None:
    """House rule: small functions with one responsibility (a CLI command's option table counts; keep it lean)."""
    long = []
    for folder in ("edgedx", "runtime", "training", "export"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
