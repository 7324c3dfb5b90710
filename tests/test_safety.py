"""Untrusted files only ever raise prefixtune's own clear errors; failed writes keep the old file."""

from __future__ import annotations

import errno
import json
import os

import pytest
import tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefixtune import PrefixModel, PrefixTuneError, attach, serialization
from prefixtune.data import read_table
from prefixtune.serialization import CONFIG_NAME, WEIGHTS_NAME

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def base():
    return tiny.make("llama")


@pytest.fixture(scope="module")
def good(tmp_path_factory, base):
    path = tmp_path_factory.mktemp("good")
    attach(base, num_virtual_tokens=2).save_pretrained(path)
    return {name: (path / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


def load_from(tmp_path, base, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    PrefixModel.from_pretrained(base, tmp_path)


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_as_prefix_files(tmp_path_factory, base, good, data):
    for target in (CONFIG_NAME, WEIGHTS_NAME):
        folder = tmp_path_factory.mktemp("fuzz")
        with pytest.raises(PrefixTuneError):
            load_from(folder, base, {**good, target: data})


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10_000), which=st.sampled_from([CONFIG_NAME, WEIGHTS_NAME]))
def test_truncated_prefix_files(tmp_path_factory, base, good, cut, which):
    data = good[which]
    # Cutting only the config's trailing newline leaves complete JSON, so every cut removes real content.
    whole = len(data.rstrip()) if which == CONFIG_NAME else len(data)
    cut = cut % whole
    folder = tmp_path_factory.mktemp("cut")
    with pytest.raises(PrefixTuneError):
        load_from(folder, base, {**good, which: data[:cut]})


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(
    key=st.sampled_from(
        [
            "method",
            "num_virtual_tokens",
            "layers",
            "reparam",
            "reparam_hidden",
            "init",
            "text",
            "seed",
            "position_offset",
            "task",
            "head_modules",
            "huge",
        ]
    ),
    value=JSONISH,
)
def test_wrong_types_and_huge_numbers_in_config(tmp_path_factory, base, good, key, value):
    record = json.loads(good[CONFIG_NAME])
    record["prefix"][key] = value
    folder = tmp_path_factory.mktemp("cfg")
    try:
        load_from(folder, base, {**good, CONFIG_NAME: json.dumps(record).encode()})
    except PrefixTuneError:
        pass  # the only acceptable failure; a valid variation may also load


@FUZZ
@given(data=st.binary(max_size=300), ext=st.sampled_from([".csv", ".tsv", ".json", ".jsonl"]))
def test_random_bytes_as_data_files(tmp_path_factory, data, ext):
    path = tmp_path_factory.mktemp("table") / f"data{ext}"
    path.write_bytes(data)
    try:
        rows = read_table(str(path))
    except PrefixTuneError:
        return
    assert rows and all(isinstance(r["text"], str) for r in rows)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """A disk that fills up mid-write: the old prefix file stays, the error is reported, no temp file."""
    model = attach(tiny.make("llama"), num_virtual_tokens=2, init="random")
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    other = attach(tiny.make("llama"), num_virtual_tokens=2, init="random", seed=9)
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    PrefixModel.from_pretrained(tiny.make("llama"), tmp_path)  # still loads


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.txt"
    serialization.write_bytes(target, b"old")
    with pytest.raises(RuntimeError), serialization.atomic_path(target) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["out.txt"]
