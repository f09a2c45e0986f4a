"""Every bad input in the generated corpus gives one CheckpointError naming the file (and tensor)."""

from __future__ import annotations

import itertools
import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from merging.checkpoint import open_checkpoint
from merging.errors import CheckpointError

try:
    from . import formats_corpus as corpus
except ImportError:
    import formats_corpus as corpus

CASES = corpus.all_cases()


def open_and_read_all(path: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(path)
    try:
        return {name: ck.get(name) for name in ck.names()}
    finally:
        ck.close()


def test_the_corpus_is_broad() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert sum(i.startswith("truncated-at-") for i in ids) >= 10
    assert len(ids) >= 70


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error(case: corpus.BadInput, tmp_path: Path) -> None:
    expect = case.build(tmp_path)
    with pytest.raises(CheckpointError) as info:
        open_and_read_all(expect.open)
    error = info.value
    message = str(error)
    assert str(expect.names) in message
    assert error.path == expect.names
    if expect.tensor is not None:
        assert error.tensor == expect.tensor
        assert f"tensor '{expect.tensor}'" in message
    if expect.message is not None:
        assert expect.message in message
    if expect.must_not_exist is not None:
        assert not expect.must_not_exist.exists(), "the pickle's code ran"
    assert "Traceback" not in message and "weights_only=False" not in message


def test_the_malicious_pickle_is_live(tmp_path: Path) -> None:
    """The refusal tests mean something only if the payload really runs when loaded unsafely."""
    case = next(c for c in CASES if c.id == "legacy-pickle-runs-code")
    expect = case.build(tmp_path)
    assert expect.must_not_exist is not None and not expect.must_not_exist.exists()
    with open(expect.open, "rb") as fh:
        pickle.load(fh)  # the unsafe load the readers never do
    assert expect.must_not_exist.exists()


# -- fuzzing ----------------------------------------------------------------------------

VALID = corpus.valid_safetensors()
HEADER_END = 8 + int.from_bytes(VALID[:8], "little")
DIGITS = [i for i in range(8, HEADER_END) if chr(VALID[i]).isdigit()]
_counter = itertools.count()

positions = st.one_of(st.integers(0, HEADER_END - 1), st.integers(0, len(VALID) - 1))
byte_edits = st.lists(st.tuples(positions, st.integers(0, 255)), max_size=6)
digit_edits = st.lists(st.tuples(st.sampled_from(DIGITS), st.sampled_from(b"0123456789")), max_size=4)
cuts = st.one_of(st.none(), st.integers(0, len(VALID)))
inserts = st.one_of(st.none(), st.tuples(st.integers(0, len(VALID)), st.binary(min_size=1, max_size=9)))


# `make fuzz` raises the budget through ALLOY_FUZZ_EXAMPLES; CI keeps the small default.
@settings(max_examples=int(os.environ.get("ALLOY_FUZZ_EXAMPLES", "200")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(byte_edits=byte_edits, digit_edits=digit_edits, cut=cuts, insert=inserts)
def test_fuzzed_safetensors_open_or_fail_cleanly(tmp_path_factory, byte_edits, digit_edits, cut, insert) -> None:
    """Mutated bytes either read back or raise CheckpointError; never another exception, never a crash.

    When the reader accepts a mutated file, the safetensors library must accept it too and agree on
    every tensor, so the validation is never looser than the reference implementation.
    """
    blob = bytearray(VALID)
    for pos, value in digit_edits + byte_edits:
        blob[pos] = value
    if insert is not None:
        blob[insert[0] : insert[0]] = insert[1]
    if cut is not None:
        del blob[cut:]
    path = tmp_path_factory.getbasetemp() / f"fuzz-{next(_counter)}.safetensors"  # a new file: no stale mapping
    path.write_bytes(bytes(blob))
    try:
        tensors = open_and_read_all(path)
    except CheckpointError as error:
        assert error.path == path
        return
    with safe_open(str(path), framework="pt") as reference:
        assert sorted(reference.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            expected = reference.get_tensor(name)
            assert tensor.dtype == expected.dtype and tensor.shape == expected.shape
            assert _raw_bytes(tensor) == _raw_bytes(expected)


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """Bit patterns, so that NaNs produced by mutation compare equal to themselves."""
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).tolist())
