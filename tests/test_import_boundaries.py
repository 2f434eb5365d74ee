"""Package boundaries, checked statically with ``ast`` (nothing is imported).

Which code runs in which process is a property of the import graph, so the graph is checked:

* ``model/`` is the inference core: no web stack, Redis, metrics, ``server`` or ``cache``; its
  core modules do not import its tools (``model.tools``) or the demo (``model.demo``).
* ``cache/`` stores tensors: no model, no server.
* ``server.engine`` (the seam) imports neither ``server.api`` nor ``server.worker``;
  ``server.api`` (the HTTP process) does not import ``server.worker``; ``server.fetch`` imports
  no other room; ``server.worker`` does not import ``server.api``.
* Torch-free rooms: nothing reachable from ``server.api``, ``server.engine``, ``server.fetch``,
  the torch-free leaves of ``model`` (video, image, conversation, subtitles) and of ``cache`` (keys,
  manifest, errors, purge) imports torch, transformers or safetensors, following project imports
  transitively (lazy ones inside functions included).

Every ``import``/``from ... import`` counts, including ones inside functions and ``TYPE_CHECKING``
blocks, relative imports resolved to absolute names, and ``importlib.import_module("...")`` /
``__import__("...")`` calls with a literal name.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "cache", "server")

# room (a module prefix) -> names it must not import (a name matches itself and its submodules)
FORBIDDEN: dict[str, set[str]] = {
    "model": {"fastapi", "starlette", "redis", "prometheus_client", "httpx", "uvicorn", "server", "cache"},
    "cache": {"model", "server", "fastapi", "prometheus_client"},
    "server.engine": {"server.api", "server.worker"},
    "server.api": {"server.worker"},
    "server.fetch": {"server.api", "server.engine", "server.worker", "fastapi", "model", "cache"},
    "server.worker": {"server.api"},
}
MODEL_CORE_FORBIDDEN = {"model.tools", "model.demo"}  # for model/*.py, the inference core itself
TORCH = {"torch", "transformers", "safetensors", "accelerate", "bitsandbytes"}
TORCH_FREE = ("server.api", "server.engine", "server.fetch", "server.settings", "server.metrics",
              "model.video", "model.decoders", "model.image", "model.conversation", "model.subtitles",
              "cache.keys", "cache.manifest", "cache.errors", "cache.purge")


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
            found += [(node.lineno, f"{head}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _matches(name: str, banned: set[str]) -> str | None:
    return next((b for b in banned if name == b or name.startswith(b + ".")), None)


@cache
def project_modules(root: Path = ROOT) -> dict[str, Path]:
    return {_module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def _project_module(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import name refers to (``from a.b import c`` may name module a.b.c or a.b)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path = ROOT) -> dict[str, list[tuple[int, str]]]:
    return {name: imported_modules(path, root) for name, path in project_modules(root).items()}


def _violations(room: str, banned: set[str], root: Path = ROOT) -> list[str]:
    out = []
    for name, path in project_modules(root).items():
        if not (name == room or name.startswith(room + ".")):
            continue
        core = room == "model" and path.parent == root / "model"  # model/*.py, not its subpackages
        rules = banned | (MODEL_CORE_FORBIDDEN if core else set())
        for line, imported in imported_modules(path, root):
            hit = _matches(imported, rules)
            if hit and not (name == hit or name.startswith(hit + ".")):
                out.append(f"{path.relative_to(root)}:{line} imports {imported}")
    return out


def torch_paths(start: str, root: Path = ROOT) -> list[str]:
    """Import chains from ``start`` (a module or package prefix) to an import of torch & co."""
    modules = project_modules(root)
    graph = import_graph(root)
    seeds = {parent for m in modules if m == start or m.startswith(start + ".") for parent in _parents(m)}
    seen: dict[str, str] = {m: m for m in seeds}
    queue, found = list(seeds), []
    while queue:
        current = queue.pop()
        for line, imported in graph[current]:
            if _matches(imported, TORCH):
                found.append(f"{seen[current]} -> {imported} ({modules[current].relative_to(root)}:{line})")
                continue
            target = _project_module(imported, modules)
            # importing a.b.c runs a/__init__ and a/b/__init__ too
            for parent in _parents(target) if target else []:
                if parent not in seen:
                    seen[parent] = f"{seen[current]} -> {parent}"
                    queue.append(parent)
    return found


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_boundaries(room: str) -> None:
    prefix = ROOT / room.replace(".", "/")
    assert prefix.is_dir() or prefix.with_suffix(".py").is_file(), f"no {room} in this checkout"
    assert _violations(room, FORBIDDEN[room]) == []


@pytest.mark.parametrize("room", TORCH_FREE)
def test_torch_free_rooms(room: str) -> None:
    assert room in project_modules() or any(m.startswith(room + ".") for m in project_modules()), room
    assert torch_paths(room) == []


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
    project_modules.cache_clear()
    try:
        reported = " ".join(_violations("model", FORBIDDEN["model"], tmp_path))
    finally:
        project_modules.cache_clear()
    for banned in ("fastapi", "redis", "starlette", "server", "prometheus_client", "cache.keys", "uvicorn",
                   "httpx"):
        assert f"imports {banned}" in reported
    assert "model.ok" not in reported


def test_the_checker_follows_imports_to_torch(tmp_path: Path) -> None:
    """A torch import two project modules away (and only inside a function) is found, with its path."""
    for pkg in ("server/api", "model", "cache"):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "server" / "__init__.py").write_text("")
    (tmp_path / "server" / "api" / "routes.py").write_text("from model.helper import thing\n")
    (tmp_path / "model" / "helper.py").write_text("def thing():\n    from . import heavy\n")
    (tmp_path / "model" / "heavy.py").write_text("import torch\n")
    (tmp_path / "cache" / "keys.py").write_text("import hashlib\n")
    project_modules.cache_clear()
    try:
        paths = torch_paths("server.api", tmp_path)
        clean = torch_paths("cache.keys", tmp_path)
    finally:
        project_modules.cache_clear()
    assert paths == ["server.api.routes -> model.helper -> model.heavy -> torch (model/heavy.py:1)"]
    assert clean == []
