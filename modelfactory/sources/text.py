"""Load evaluation/calibration text from a local file, the data dir, or ``datasets``."""

from __future__ import annotations

from pathlib import Path

from modelfactory.core.errors import CalibrationError, SourceNotFoundError
from modelfactory.core.settings import get_settings
from modelfactory.core.specs import TextSource

#: datasets split name -> file stem used by the usual local copies (e.g. wikitext's valid.txt)
_SPLIT_FILE_STEMS = {"validation": ("validation", "valid"), "test": ("test",), "train": ("train",)}


def local_candidates(source: TextSource, data_dir: Path | None) -> list[Path]:
    """Files that would satisfy *source* from a local data dir, most specific first."""
    if data_dir is None:
        return []
    folder = data_dir / (source.config or source.dataset)
    stems = _SPLIT_FILE_STEMS.get(source.split, (source.split,))
    return [folder / f"{stem}.txt" for stem in stems]


def _read_path(path: Path) -> str:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise SourceNotFoundError(f"text folder {str(path)!r} has no .txt files: add some or point elsewhere")
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    if not path.is_file():
        raise SourceNotFoundError(f"text file {str(path)!r} does not exist: fix the path in the spec")
    return path.read_text(encoding="utf-8")


def load_text(source: TextSource, *, data_dir: Path | None = None) -> tuple[str, str]:
    """Return ``(text, origin)``; *origin* says which file or dataset it came from."""
    if source.path:
        path = Path(source.path).expanduser()
        return _read_path(path), str(path)
    for candidate in local_candidates(source, data_dir or get_settings().data_dir):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8"), str(candidate)
    return _load_dataset(source), f"datasets:{source.label()}"


def _load_dataset(source: TextSource) -> str:
    try:
        import datasets

        ds = datasets.load_dataset(source.dataset, source.config, split=source.split)
        return "\n".join(row for row in ds[source.text_field] if row is not None)
    except Exception as exc:  # offline, unknown name, missing field ...
        raise SourceNotFoundError(
            f"could not load text {source.label()!r} with datasets ({type(exc).__name__}: {exc}); "
            "set MODELFACTORY_DATA_DIR to a folder holding <config>/<split>.txt, or give 'path'"
        ) from exc


def require_tokens(n_available: int, n_needed: int, *, what: str, label: str) -> None:
    if n_available < n_needed:
        raise CalibrationError(
            f"{what} text {label!r} has {n_available} tokens but {n_needed} are needed: "
            "use a longer text or lower num_samples/seq_len"
        )
