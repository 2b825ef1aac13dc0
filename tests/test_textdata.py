"""Text loading for calibration/evaluation, and calibration windows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelfactory.core.errors import CalibrationError, SourceNotFoundError
from modelfactory.core.settings import get_settings
from modelfactory.core.specs import TextSource
from modelfactory.sources.text import load_text, local_candidates, require_tokens
from modelfactory.tasks.quantize import calibration_windows


@pytest.fixture
def data_dir() -> Path:
    return Path(os.environ["MODELFACTORY_DATA_DIR"])


def test_load_text_from_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("héllo wörld\nsecond line\n", encoding="utf-8")
    text, origin = load_text(TextSource(path=str(path)))
    assert text == "héllo wörld\nsecond line\n"
    assert origin == str(path)


def test_load_text_from_folder_of_txt(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "c.txt").write_text("third")
    (tmp_path / "notes.md").write_text("not text data")
    text, origin = load_text(TextSource(path=str(tmp_path)))
    assert text == "first\n\nsecond\n\nthird"
    assert origin == str(tmp_path)


def test_load_text_from_empty_folder(tmp_path):
    with pytest.raises(SourceNotFoundError, match="no .txt files"):
        load_text(TextSource(path=str(tmp_path)))


def test_load_text_missing_path(tmp_path):
    with pytest.raises(SourceNotFoundError, match="does not exist") as info:
        load_text(TextSource(path=str(tmp_path / "nope.txt")))
    assert isinstance(info.value, FileNotFoundError)


def test_load_text_from_data_dir_test_split(data_dir):
    text, origin = load_text(TextSource())  # wikitext / wikitext-2-raw-v1 / test
    expected = data_dir / "wikitext-2-raw-v1" / "test.txt"
    assert origin == str(expected)
    assert text == expected.read_text(encoding="utf-8")
    assert len(text) > 100_000


def test_load_text_from_data_dir_validation_split_maps_to_valid_txt(data_dir):
    text, origin = load_text(TextSource(dataset="wikitext", config="wikitext-2-v1", split="validation"))
    expected = data_dir / "wikitext-2-v1" / "valid.txt"
    assert origin == str(expected)
    assert text == expected.read_text(encoding="utf-8")


def test_local_candidates(tmp_path):
    assert local_candidates(TextSource(split="validation", config="c"), tmp_path) == [
        tmp_path / "c" / "validation.txt", tmp_path / "c" / "valid.txt",
    ]
    assert local_candidates(TextSource(dataset="ds", config=None, split="dev"), tmp_path) == [tmp_path / "ds" / "dev.txt"]
    assert local_candidates(TextSource(), None) == []


def test_explicit_data_dir_argument(tmp_path):
    (tmp_path / "myconf").mkdir()
    (tmp_path / "myconf" / "train.txt").write_text("local copy")
    text, origin = load_text(TextSource(dataset="whatever", config="myconf", split="train"), data_dir=tmp_path)
    assert (text, origin) == ("local copy", str(tmp_path / "myconf" / "train.txt"))


@pytest.mark.parametrize("source", [TextSource(), TextSource(dataset="modelfactory-tests/no-such-dataset", config=None)])
def test_dataset_without_local_copy_offline(tmp_path, set_env, source):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    set_env(MODELFACTORY_DATA_DIR=str(empty), HF_DATASETS_OFFLINE="1")
    assert get_settings().data_dir == empty
    with pytest.raises(SourceNotFoundError) as info:
        load_text(source)
    message = str(info.value)
    assert "MODELFACTORY_DATA_DIR" in message
    assert source.label() in message


def test_require_tokens():
    require_tokens(65, 65, what="calibration", label="x")
    with pytest.raises(CalibrationError, match="has 10 tokens but 65 are needed"):
        require_tokens(10, 65, what="calibration", label="x")


# --------------------------------------------------------------------------- calibration windows
def _is_contiguous_slice(window: list[int]) -> bool:
    return window == list(range(window[0], window[0] + len(window)))


def test_calibration_windows_count_length_and_distinct():
    ids = list(range(1000))
    windows = calibration_windows(ids, num_samples=8, seq_len=64, seed=0)
    assert len(windows) == 8
    assert all(len(w) == 64 and _is_contiguous_slice(w) for w in windows)
    starts = [w[0] for w in windows]
    assert len(set(starts)) == 8
    # distinct windows do not overlap when the text has room for them
    assert all(b - a >= 64 for a, b in zip(sorted(starts), sorted(starts)[1:]))


def test_calibration_windows_deterministic_by_seed():
    ids = list(range(5000))
    a = calibration_windows(ids, num_samples=16, seq_len=64, seed=0)
    assert a == calibration_windows(ids, num_samples=16, seq_len=64, seed=0)
    b = calibration_windows(ids, num_samples=16, seq_len=64, seed=1)
    assert a != b


def test_calibration_windows_overlap_when_text_is_short():
    ids = list(range(200))
    windows = calibration_windows(ids, num_samples=20, seq_len=64, seed=3)
    assert len(windows) == 20
    assert all(len(w) == 64 and _is_contiguous_slice(w) and w[-1] < 200 for w in windows)
    assert windows == calibration_windows(ids, num_samples=20, seq_len=64, seed=3)


def test_calibration_windows_exactly_one_window():
    assert calibration_windows(list(range(65)), num_samples=1, seq_len=64, seed=0) == [list(range(64))]


@pytest.mark.parametrize("n", [0, 10, 64])
def test_calibration_windows_too_short(n):
    with pytest.raises(CalibrationError, match=f"has {n} tokens.*seq_len=64"):
        calibration_windows(list(range(n)), num_samples=4, seq_len=64, seed=0)
