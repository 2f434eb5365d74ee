"""Package boundaries, checked statically with ``ast`` (nothing is imported).

``model/`` is the pure inference core: it never imports the web stack, Redis, metrics or the
``server`` / ``cache`` packages. ``cache/`` stores tensors and never imports the model or the server.
Every ``import``/``from ... import`` counts, including ones inside functions and ``TYPE_CHECKING``
blocks, relative imports resolved to absolute names, and ``importlib.import_module("...")`` /
``__import__("...")`` calls with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "model": {"fastapi", "starlette", "redis", "prometheus_client", "httpx", "uvicorn", "server", "cache"},
    "cache": {"model", "server", "fastapi", "prometheus_client"},
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                head = ".".join(base + ([node.module] if node.module else []))
            else:
                head = node.module or ""
            found.append((node.lineno, head))
            found += [(node.lineno, f"{head}.{alias.name}") for alias in node.names if not node.module]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _violations(package: str, root: Path = ROOT) -> list[str]:
    banned = FORBIDDEN[package]
    out = []
    for path in sorted((root / package).rglob("*.py")):
        for line, name in imported_modules(path, root):
            if name.split(".")[0] in banned:
                out.append(f"{path.relative_to(root)}:{line} imports {name}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_boundaries(package: str) -> None:
    if not (ROOT / package).is_dir():
        pytest.skip(f"no {package}/ package in this checkout")
    files = list((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    assert _violations(package) == []


def test_the_checker_sees_every_import_form(tmp_path: Path) -> None:
    """The checker itself: each form of a forbidden import is reported with its resolved name."""
    pkg = tmp_path / "model" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "model" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text(
        "import fastapi\n"
        "import redis.asyncio as aioredis\n"
        "from starlette.responses import Response\n"
        "from ...server import app\n"
        "from ..ok import thing\n"
        "def f():\n"
        "    import prometheus_client\n"
        "    import importlib\n"
        "    importlib.import_module('cache.keys')\n"
        "    __import__('uvicorn')\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from httpx import Client\n"
    )
    names = {name for _, name in imported_modules(pkg / "bad.py", tmp_path)}
    assert {"fastapi", "redis.asyncio", "starlette.responses", "server", "model.ok", "prometheus_client",
            "cache.keys", "uvicorn", "httpx"} <= names
    reported = " ".join(_violations("model", tmp_path))
    for banned in ("fastapi", "redis", "starlette", "server", "prometheus_client", "cache.keys", "uvicorn", "httpx"):
        assert f"imports {banned}" in reported
    assert "model.ok" not in reported
