"""What a published artifact may say about where things came from: names and hashes, never this machine's paths.

A manifest and a model card leave the machine (a file store others read, S3, the Hub), so a local
source goes out as its file or folder name plus its SHA-256 — the catalog keeps the full path.

- :func:`public_ref`: a local path or ``file://`` URL → its name; Hub ids, ``hf://``, ``s3://`` unchanged.
- :func:`public_spec`: the spec with every local path field (base / adapter URIs, text ``path``
  fields, a ``file://`` destination) replaced by its name, and the list of those sources with
  their SHA-256.
- :func:`scrub_local_paths`: the safety net over everything published — any string naming a path
  under a machine-local root (home, work dir, caches, ``site-packages``, temp, ...) keeps only the
  path's last component.
- :func:`retarget_snippet`: the "Load it" code the runnability check ran on the local folder,
  pointed at the published model (repo id + revision) instead.
"""

from __future__ import annotations

import json
import os
import re
import site
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from modelfactory.core.hashing import file_sha256, tree_sha256
from modelfactory.core.ids import is_hub_repo_id

#: Schemes that name something off this machine (published as they are).
REMOTE_SCHEMES = frozenset({"hf", "s3", "http", "https", "gs"})
#: Spec keys whose string values name a source or destination (``path``: a TextSource file/folder).
PATH_KEYS = frozenset({"uri", "path", "destination"})
#: Characters that end a path inside free text (quotes, brackets, whitespace, separators).
_STOP = r"\s\"'`<>()\[\]{},;"


def is_local_ref(ref: str) -> bool:
    """Whether *ref* names something on this machine: a path (absolute, relative, ``~``) or a ``file://`` URL."""
    scheme = urlparse(ref).scheme
    if scheme == "file":
        return True
    if scheme in REMOTE_SCHEMES or (scheme and len(scheme) > 1):  # one letter: a Windows drive
        return False
    # owner/name is a Hub repo, unless a relative folder of that name exists
    return not is_hub_repo_id(ref) or Path(ref).expanduser().exists()


def local_name(ref: str) -> str:
    """The file or folder name of a local path or ``file://`` URL."""
    path = unquote(urlparse(ref).path) if ref.startswith("file:") else ref
    return PurePosixPath(path.rstrip("/")).name or path


def public_ref(ref: str | None) -> str | None:
    """*ref* as a published artifact may show it: a local path → its name; anything else unchanged."""
    if not ref:
        return ref
    return local_name(ref) if is_local_ref(ref) else ref


def local_sha256(ref: str) -> str | None:
    """SHA-256 of a local file (of its bytes) or folder (``tree_sha256``), ``None`` if it is not there."""
    path = Path(unquote(urlparse(ref).path) if ref.startswith("file:") else ref).expanduser()
    try:
        if path.is_file():
            return file_sha256(path)
        if path.is_dir():
            return tree_sha256(path)
    except OSError:
        return None
    return None


def public_spec(spec: Mapping[str, Any], *, known: Mapping[str, str] | None = None) -> tuple[dict, list[dict]]:
    """*spec* with every local path under a :data:`PATH_KEYS` key replaced by its name, and the local
    sources it named: ``[{"field": "base.uri", "name": ..., "sha256": ...}, ...]``.

    *known* maps a path (as the spec or a step record names it) to its SHA-256 when a step already
    hashed it (base model, adapters), so large folders are not hashed again; other sources (text
    files) are hashed here. The publish destination is renamed but is not a source, so not listed.
    """
    known = dict(known or {})
    found: list[dict] = []

    def walk(value: Any, where: str) -> Any:
        if isinstance(value, Mapping):
            out = {}
            for key, item in value.items():
                field = f"{where}.{key}" if where else str(key)
                if key in PATH_KEYS and isinstance(item, str) and item and is_local_ref(item):
                    out[key] = local_name(item)
                    if key != "destination":
                        sha = known.get(item) or known.get(str(Path(item).expanduser().resolve())) or local_sha256(item)
                        found.append({"field": field, "name": out[key], "sha256": sha})
                else:
                    out[key] = walk(item, field)
            return out
        if isinstance(value, (list, tuple)):
            return [walk(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return value

    return walk(spec, ""), found


# --------------------------------------------------------------------------- the safety net
def local_roots(*extra: str | os.PathLike | None) -> list[str]:
    """Folders whose paths are this machine's own: the factory's home, work, cache, data and store
    folders, the user's home, the Python installation (``site-packages``), the temp folder and the
    working directory, plus *extra*; resolved and unresolved, the filesystem root left out."""
    from modelfactory.core.settings import get_settings

    settings = get_settings()
    candidates: list[Any] = [*extra, settings.home, settings.resolved_work_dir, settings.resolved_cache_dir,
                             settings.data_dir, Path.home(), sys.prefix, sys.base_prefix, sys.exec_prefix,
                             tempfile.gettempdir(), os.getcwd(), *sysconfig.get_paths().values()]
    store = settings.resolved_store_url
    if urlparse(store).scheme in ("", "file"):
        candidates.append(unquote(urlparse(store).path) if store.startswith("file:") else store)
    try:
        candidates += [*site.getsitepackages(), site.getusersitepackages()]
    except AttributeError:  # some virtualenv site modules lack them
        pass
    roots: set[str] = set()
    for candidate in candidates:
        if not candidate or "://" in str(candidate):  # an s3:// step output is no folder of this machine
            continue
        path = Path(candidate).expanduser()
        for form in (path, path.resolve()):
            text = str(form).rstrip("/")
            if form.is_absolute() and len(form.parts) > 1 and text:
                roots.add(text)
    return sorted(roots, key=len, reverse=True)


def _path_pattern(roots: Iterable[str]) -> re.Pattern[str] | None:
    roots = list(roots)
    if not roots:
        return None
    alternatives = "|".join(re.escape(r) for r in sorted(roots, key=len, reverse=True))
    # it starts a word (not inside s3://bucket/tmp/... or another path), and is never a prefix of a
    # longer name (/home/ann vs /home/anna)
    return re.compile(rf"(?<![^{_STOP}=:])(?:file://)?(?:{alternatives})(?:/[^{_STOP}]*)?(?![^{_STOP}/])")


def scrub_text(text: str, *, roots: Iterable[str]) -> str:
    """*text* with every path under one of *roots* (or its ``file://`` URL) cut to its last component."""
    pattern = _path_pattern(roots)
    if pattern is None:
        return text
    return pattern.sub(lambda m: PurePosixPath(m.group(0).removeprefix("file://").rstrip("/")).name, text)


def scrub_local_paths(value: Any, *, roots: Iterable[str]) -> Any:
    """*value* (JSON-like data) with :func:`scrub_text` applied to every string in it, keys included."""
    pattern = _path_pattern(roots)
    if pattern is None:
        return value

    def scrub(item: Any) -> Any:
        if isinstance(item, str):
            return pattern.sub(lambda m: PurePosixPath(m.group(0).removeprefix("file://").rstrip("/")).name, item)
        if isinstance(item, Mapping):
            return {scrub(k) if isinstance(k, str) else k: scrub(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [scrub(v) for v in item]
        return item

    return scrub(value)


# --------------------------------------------------------------------------- the "Load it" snippet
_STRING = r'"(?:[^"\\]|\\.)*"'
_FROM_PRETRAINED = re.compile(rf"from_pretrained\({_STRING}(?:, revision={_STRING})?")


def retarget_snippet(snippet: str, *, model: str, revision: str | None = None) -> str:
    """*snippet* with every ``from_pretrained("<where>"[, revision="..."]`` loading *model* (at *revision*).

    The runnability check runs the card's snippet on the local artifact folder; published, the same
    code loads the published model. Only the model reference changes (JSON string literals are
    valid Python for these names, the same quoting the check's snippet uses).
    """
    where = json.dumps(model, ensure_ascii=False) + (f", revision={json.dumps(revision)}" if revision else "")
    return _FROM_PRETRAINED.sub(lambda _m: f"from_pretrained({where}", snippet)
