"""A demo corpus that needs no download: the docstrings of the Python standard library.

The docstrings are read by parsing the library's source files with `ast` (nothing is imported, so
no module's import-time side effects can run), walking files in sorted module-name order and each
file in source order. One document per module: the module docstring, then each class, function
and method docstring under its qualified name. All of CPython 3.11's library gives about 1.5 MB.

The result depends on the Python version (docstrings change between releases), which is recorded
with the tokenizer in a manifest beside the dataset; a later call with the same manifest reuses
the files instead of rebuilding.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import platform
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator, Sequence

from .indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_dtype
from .tokenizers import build_tokenizer

logger = logging.getLogger(__name__)

DEMO_CORPUS_VERSION = 1
DEFAULT_TOKENIZER = {"type": "byte", "model": None}

# Test suites (odd, often deliberately broken files) and bundled applications are not library text.
_SKIPPED_ANYWHERE = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
_SKIPPED_TOP_LEVEL = {"idlelib", "turtledemo", "lib2to3", "ensurepip"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stdlib_module_files(modules: Sequence[str] | None = None) -> list[tuple[str, Path]]:
    """(module name, source path) pairs, sorted by name: every library module, or just `modules`."""
    root = stdlib_root()
    if modules is not None:
        found = []
        for name in sorted(set(modules)):
            base = root.joinpath(*name.split("."))
            for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
                if candidate.is_file():
                    found.append((name, candidate))
                    break
            else:
                raise ValueError(f"demo corpus: {name!r} is not a pure-Python module of the standard library in {root}")
        return found
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in _SKIPPED_TOP_LEVEL or _SKIPPED_ANYWHERE.intersection(rel.parts[:-1]):
            continue
        found.append((_module_name(rel), path))
    return sorted(found)


def _docstrings(node: ast.AST, qualname: str) -> Iterator[tuple[str, str]]:
    doc = ast.get_docstring(node, clean=True)
    if doc:
        yield qualname, doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child, f"{qualname}.{child.name}")


def module_document(name: str, path: Path) -> str:
    """All docstrings of one source file as one text; "" if it has none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old modules' strings
        tree = ast.parse(path.read_bytes(), filename=str(path))
    return "\n\n".join(f"{qualname}\n\n{doc}" for qualname, doc in _docstrings(tree, name))


def collect_documents(modules: Sequence[str] | None = None, max_bytes: int | None = None) -> list[str]:
    """The corpus text, one document per module, stopping after about `max_bytes` of UTF-8."""
    docs: list[str] = []
    size = 0
    for name, path in stdlib_module_files(modules):
        try:
            text = module_document(name, path)
        except (SyntaxError, ValueError, UnicodeDecodeError) as e:
            if modules is not None:
                raise ValueError(f"demo corpus: cannot parse {path}: {e}") from e
            logger.debug("demo corpus: skipping %s (%s)", path, e)
            continue
        if not text:
            continue
        docs.append(text)
        size += len(text.encode("utf-8"))
        if max_bytes is not None and size >= max_bytes:
            break
    if not docs:
        raise ValueError(f"demo corpus: no docstrings found in {stdlib_root()} (modules={modules})")
    return docs


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_key(tokenizer_spec: dict, modules: Sequence[str] | None, max_bytes: int | None) -> dict:
    model = tokenizer_spec.get("model")
    return {
        "version": DEMO_CORPUS_VERSION,
        "python": platform.python_version(),
        "tokenizer": tokenizer_spec,
        # The model's content, not just its path: retraining a tokenizer in place must rebuild.
        "tokenizer_sha256": _file_sha256(model) if model else None,
        "modules": sorted(set(modules)) if modules is not None else None,
        "max_bytes": max_bytes,
    }


def _is_built(prefix: Path, manifest_path: Path, key: dict) -> bool:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if manifest.get("key") != key:
        return False
    try:
        ds = IndexedDataset(prefix)
    except (FileNotFoundError, ValueError):
        return False
    return len(ds) == manifest.get("documents") and ds.total_tokens == manifest.get("tokens")


def build_demo_corpus(out_dir: str | os.PathLike, tokenizer_spec: dict | None = None,
                      modules: Sequence[str] | None = None, max_bytes: int | None = None) -> str:
    """Build (or reuse) the standard-library docstring corpus in `out_dir`; returns its prefix.

    `tokenizer_spec` defaults to the byte tokenizer. `modules` restricts the corpus to the named
    modules (e.g. ["json", "textwrap"]); `max_bytes` stops collecting after that much text.
    """
    tokenizer_spec = dict(DEFAULT_TOKENIZER if tokenizer_spec is None else tokenizer_spec)
    tokenizer = build_tokenizer(tokenizer_spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / f"stdlib_docstrings_{tokenizer_spec['type']}"
    manifest_path = Path(f"{prefix}.manifest.json")
    key = _manifest_key(tokenizer_spec, modules, max_bytes)
    if _is_built(prefix, manifest_path, key):
        logger.info("using the demo corpus (Python standard library docstrings) at %s", prefix)
        return str(prefix)

    docs = collect_documents(modules, max_bytes)
    with IndexedDatasetBuilder(prefix, best_dtype(tokenizer.vocab_size), vocab_size=tokenizer.vocab_size,
                               eod_id=tokenizer.eod_id) as builder:
        for doc in docs:
            builder.add_document(tokenizer.encode(doc))
    manifest = {"key": key, "documents": builder.num_documents, "tokens": builder.total_tokens,
                "text_bytes": sum(len(d.encode("utf-8")) for d in docs)}
    tmp = manifest_path.with_name(f"{manifest_path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    logger.info("built a demo corpus (Python standard library docstrings: %d documents, %d tokens) at %s",
                builder.num_documents, builder.total_tokens, prefix)
    return str(prefix)
