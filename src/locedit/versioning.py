"""One cache-key policy: every stored value is keyed by what it was computed from.

A content key hashes four things: the model fingerprint, the record's content (its text, not
only its id), the effective parameters, and the *code version* of the modules that compute the
value. The code version is a hash of the source files of the given modules and of every
``locedit`` module they import (followed through the source, so a refactor that moves code
between modules needs no list to be kept up to date). A change to a module recomputes the
values whose modules import it, and nothing else.

This module is low level on purpose (no ``locedit`` imports): tracking code may tag runs with
:func:`package_version`.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
from collections.abc import Iterable
from dataclasses import asdict, is_dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

#: Bump to invalidate every key at once (a change of the key format itself).
KEY_POLICY_VERSION = 1


def _name(module: ModuleType | str) -> str:
    return module.__name__ if isinstance(module, ModuleType) else str(module)


@cache
def _source_file(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _is_package(name: str) -> bool:
    path = _source_file(name)
    return path is not None and path.name == "__init__.py"


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _defining_module(package: str, attr: str) -> str:
    """The module that defines ``package.attr`` (a re-export resolves to its origin)."""
    if _module_exists(f"{package}.{attr}"):
        return f"{package}.{attr}"
    try:
        value = getattr(importlib.import_module(package), attr)
    except (ImportError, AttributeError):
        return package
    origin = getattr(value, "__module__", None)
    if isinstance(value, ModuleType):
        origin = value.__name__
    return origin if isinstance(origin, str) and _source_file(origin) else package


@cache
def _imports(name: str, root: str) -> tuple[str, ...]:
    """The ``root`` modules that ``name``'s source imports (anywhere in the file)."""
    path = _source_file(name)
    if path is None:
        return ()
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
            found.update(t for t in targets if t == root or t.startswith(root + "."))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join([*parts, base] if base else parts)
            if base != root and not base.startswith(root + "."):
                continue
            if _is_package(base):
                found.update(_defining_module(base, alias.name) for alias in node.names)
            else:
                found.add(base)
    found.discard(name)
    return tuple(sorted(found))


def module_closure(*modules: ModuleType | str, exclude: Iterable[str] = ()) -> list[str]:
    """The given modules (a package counts with every module under it) and, transitively, the
    modules of the same top-level package they import; an ``exclude``d module is neither
    counted nor followed (e.g. the other methods a registry names, see
    :func:`locedit.sweep.plan.row_code_version`)."""
    pending: list[str] = []
    for module in modules:
        name = _name(module)
        if _source_file(name) is None:
            raise ModuleNotFoundError(f"no Python source for module {name!r}")
        pending.append(name)
        path = _source_file(name)
        if path.name == "__init__.py":
            for child in sorted(path.parent.rglob("*.py")):
                rel = child.relative_to(path.parent).with_suffix("")
                parts = [p for p in rel.parts if p != "__init__"]
                if parts:
                    pending.append(".".join([name, *parts]))
    seen: set[str] = set()
    skip = {_name(m) for m in exclude}
    while pending:
        name = pending.pop()
        if name in seen or name in skip:
            continue
        seen.add(name)
        pending.extend(_imports(name, name.partition(".")[0]))
    return sorted(seen)


def read_source(name: str) -> bytes:
    """The source bytes of module ``name`` (what its code version hashes)."""
    return _source_file(name).read_bytes()


@cache
def _code_version(names: tuple[str, ...], exclude: tuple[str, ...] = ()) -> str:
    digest = hashlib.sha256()
    for name in module_closure(*names, exclude=exclude):
        digest.update(name.encode() + b"\0")
        digest.update(read_source(name) + b"\0")
    return digest.hexdigest()[:12]


def code_version(*modules: ModuleType | str, exclude: Iterable[ModuleType | str] = ()) -> str:
    """Hash of the source of ``modules`` (module objects or dotted names) and of the modules
    they import from their own top-level package, leaving out (and not following) ``exclude``."""
    return _code_version(
        tuple(sorted({_name(m) for m in modules})), tuple(sorted({_name(m) for m in exclude}))
    )


def package_version(package: ModuleType | str = "locedit") -> str:
    """Code version of a whole package (e.g. to tag a tracking run)."""
    return code_version(package)


def clear_caches() -> None:
    """Forget computed versions (source files changed while this process runs; tests)."""
    for cached in (_source_file, _imports, _code_version):
        cached.cache_clear()


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def content_key(
    kind: str,
    *,
    model: str | None,
    record: Any,
    params: Any,
    code: str | Iterable[ModuleType | str],
    length: int = 64,
) -> str:
    """The one key of every stored value: what (``kind``), on which model, for which record
    content, with which effective parameters, computed by which code.

    ``code`` is a :func:`code_version` string or the modules to version.
    """
    version = code if isinstance(code, str) else code_version(*code)
    payload = {
        "policy": KEY_POLICY_VERSION,
        "kind": kind,
        "model": model,
        "record": record,
        "params": params,
        "code": version,
    }
    text = json.dumps(payload, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
