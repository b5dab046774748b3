"""Hostile safetensors headers: `shardpress inspect` must reject every file Python's own
`safetensors` loader rejects (same rules as huggingface `safetensors/src/tensor.rs`,
`read_metadata` / `Metadata::validate`), with a message and without panicking, and accept the
valid ones. A few rules of ours are deliberately stricter; those are listed separately."""

import json
import os
import struct
import subprocess

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save

BIN = os.environ.get("SHARDPRESS_BIN", "target/debug/shardpress")


def entry(dtype, shape, offsets):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def raw(header, data=b"", n=None):
    """A file from a header (dict, str or bytes), the data bytes and optionally a forged length."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def padded(header):
    """The header JSON with trailing spaces, as real writers pad it to a multiple of 8."""
    text = json.dumps(header, separators=(",", ":"))
    return text + " " * (8 - len(text) % 8 or 8)


TWO = {"a": entry("U8", [2], [0, 2]), "b": entry("U16", [1], [2, 4])}
FOUR = {"a": entry("U8", [4], [0, 4])}

# (id, file bytes, substring our error must contain). Python's loader rejects all of them.
# The first group is what we used to accept: the reference's InvalidOffset,
# MetadataIncompleteBuffer and HeaderTooLarge rules.
DIVERGENT = [
    ("extra_byte_after_last_tensor", raw(FOUR, b"1234\0"), "end of the file"),
    ("no_tensors_but_data", raw(padded({}), b"x"), "end of the file"),
    # Padded JSON still parses with n one short, and every tensor would read one byte early.
    ("header_length_one_short_shifts_data",
     raw(padded(FOUR), b"1234", n=len(padded(FOUR)) - 1), "end of the file"),
    ("gap_between_tensors",
     raw({"a": entry("U8", [2], [0, 2]), "b": entry("U8", [2], [4, 6])}, b"123456"), '"b"'),
    ("first_tensor_not_at_zero", raw({"a": entry("U8", [2], [2, 4])}, b"1234"), '"a"'),
    ("empty_tensor_inside_another",
     raw({"a": entry("U8", [4], [0, 4]), "e": entry("F32", [0], [2, 2])}, b"1234"), '"e"'),
    ("lone_empty_tensor_not_at_zero", raw({"e": entry("F16", [0, 3], [3, 3])}, b"123"), '"e"'),
    ("unsorted_with_gap",
     raw({"b": entry("U8", [2], [3, 5]), "a": entry("U8", [2], [0, 2])}, b"12345"), '"b"'),
]

# Rejected by both before this change; kept as regression cases.
ALREADY_REJECTED = [
    ("shorter_than_length_prefix", b"\x01\x02\x03", "8 bytes"),
    ("header_length_zero", raw(b"", b"", n=0), "zero"),
    ("header_length_beyond_file", raw(FOUR, b"1234", n=1000), "1008"),
    ("header_length_u64_max", raw(FOUR, b"1234", n=2**64 - 1), "maximum"),
    ("header_length_one_long", raw(padded(FOUR), b" 234", n=len(padded(FOUR)) + 1), "beyond"),
    ("truncated_data", raw(FOUR, b"123"), "beyond"),
    ("overlapping_tensors",
     raw({"a": entry("U8", [4], [0, 4]), "b": entry("U8", [2], [2, 4])}, b"1234"), "overlap"),
    ("same_offsets_twice",
     raw({"a": entry("U8", [4], [0, 4]), "b": entry("I8", [4], [0, 4])}, b"1234"), "overlap"),
    ("reversed_offsets", raw({"a": entry("U8", [0], [4, 0])}, b"1234"), '"a"'),
    ("shape_dtype_size_mismatch", raw({"a": entry("U16", [4], [0, 4])}, b"1234"), "8 bytes"),
    ("shape_overflow", raw({"a": entry("F32", [2**62, 8], [0, 4])}, b"1234"), "overflow"),
    ("negative_shape", raw('{"a":{"dtype":"U8","shape":[-4],"data_offsets":[0,4]}}', b"1234"), '"a"'),
    ("float_shape", raw('{"a":{"dtype":"U8","shape":[4.0],"data_offsets":[0,4]}}', b"1234"), '"a"'),
    ("shape_beyond_u64",
     raw('{"a":{"dtype":"U8","shape":[18446744073709551620],"data_offsets":[0,4]}}', b"1234"), '"a"'),
    ("three_offsets", raw({"a": entry("U8", [4], [0, 4, 4])}, b"1234"), '"a"'),
    ("missing_shape", raw({"a": {"dtype": "U8", "data_offsets": [0, 4]}}, b"1234"), "shape"),
    ("unknown_dtype", raw({"a": entry("Q4", [4], [0, 4])}, b"1234"), "Q4"),
    ("lowercase_dtype", raw({"a": entry("u8", [4], [0, 4])}, b"1234"), "u8"),
    ("metadata_value_not_a_string", raw({"__metadata__": {"k": 1}}), "__metadata__"),
    ("metadata_nested", raw({"__metadata__": {"k": {"x": "y"}}}), "__metadata__"),
    ("metadata_is_a_list", raw({"__metadata__": []}), "__metadata__"),
    ("duplicate_metadata_key", raw('{"__metadata__":{},"__metadata__":{}}'), "__metadata__"),
    ("invalid_utf8", raw(b'{"\xff":' + json.dumps(FOUR["a"]).encode() + b"}", b"1234"), "UTF-8"),
    ("not_an_object", raw("[1,2]"), "object"),
    ("nul_after_json", raw(json.dumps(FOUR) + "\0", b"1234"), "JSON"),
    ("byte_order_mark", raw("\ufeff" + json.dumps(FOUR), b"1234"), "JSON"),
    ("tensor_is_null", raw({"a": None}), '"a"'),
]

# Python accepts these; we reject them on purpose (a header that can mean two things, or a
# dtype this project does not model).
STRICTER = [
    ("duplicate_tensor_name", raw('{"a":%s,"a":%s}' % ((json.dumps(FOUR["a"]),) * 2), b"1234"),
     "more than once"),
    ("duplicate_metadata_entry",
     raw('{"__metadata__":{"k":"1","k":"2"},"a":%s}' % json.dumps(FOUR["a"]), b"1234"), "duplicate"),
    ("unknown_tensor_field", raw({"a": {**FOUR["a"], "extra": 1}}, b"1234"), "unknown field"),
    ("null_metadata", raw({"__metadata__": None, **FOUR}, b"1234"), "__metadata__"),
    ("dtype_f8_e8m0", raw({"a": entry("F8_E8M0", [4], [0, 4])}, b"1234"), "F8_E8M0"),
    ("dtype_c64", raw({"a": entry("C64", [1], [0, 8])}, b"12345678"), "C64"),
]

VALID = [
    ("two_tensors", raw(TWO, b"1234")),
    ("json_order_differs_from_offsets", raw({"b": TWO["b"], "a": TWO["a"]}, b"1234")),
    ("leading_whitespace", raw(" \n" + json.dumps(TWO), b"1234")),
    ("trailing_whitespace", raw(json.dumps(TWO) + " \t\r\n", b"1234")),
    ("empty_tensors_at_boundaries",
     raw({"e0": entry("F32", [0], [0, 0]), **TWO, "e1": entry("I64", [3, 0], [2, 2]),
          "e2": entry("U8", [0], [4, 4])}, b"1234")),
    ("no_tensors", raw(padded({}))),
    ("metadata_and_scalar", raw({"__metadata__": {"format": "pt"}, "s": entry("F32", [], [0, 4])}, b"1234")),
    ("written_by_safetensors",
     save({"w": np.arange(12, dtype=np.float16).reshape(3, 4), "z": np.zeros((0, 2), np.int32)},
          metadata={"format": "np"})),
]


def write(tmp_path, name, data):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(data)
    return str(path)


def python_loads(path):
    """Python's verdict: (True, "") if the reference loader opens it and reads every tensor."""
    try:
        with safe_open(path, "np") as f:
            for name in f.keys():
                f.get_slice(name).get_shape()
        load_file(path)
        return True, ""
    except Exception as e:  # noqa: BLE001 - any failure is a rejection
        return False, f"{type(e).__name__}: {e}"


def python_opens(path):
    """Whether the reference loader accepts the header (numpy may lack the dtype itself)."""
    try:
        with safe_open(path, "np") as f:
            for name in f.keys():
                f.get_slice(name).get_shape()
        return True
    except Exception:  # noqa: BLE001
        return False


def inspect(path):
    result = subprocess.run([BIN, "inspect", path], capture_output=True, text=True, timeout=60)
    assert "panicked" not in result.stderr, result.stderr
    return result


def assert_rejected(path, expected):
    result = inspect(path)
    assert result.returncode != 0, f"shardpress accepted {path}:\n{result.stdout}"
    message = result.stderr.strip()
    assert message, "rejected without a message"
    assert expected in message, f"{expected!r} not in {message!r}"


@pytest.mark.parametrize("name,data,expected", DIVERGENT + ALREADY_REJECTED,
                         ids=[c[0] for c in DIVERGENT + ALREADY_REJECTED])
def test_python_rejects_and_so_do_we(tmp_path, name, data, expected):
    path = write(tmp_path, name, data)
    ok, why = python_loads(path)
    assert not ok, "Python's safetensors accepts it"
    assert why.startswith("SafetensorError"), why
    assert_rejected(path, expected)


@pytest.mark.parametrize("name,data", VALID, ids=[c[0] for c in VALID])
def test_valid_files_are_accepted_by_both(tmp_path, name, data):
    path = write(tmp_path, name, data)
    ok, why = python_loads(path)
    assert ok, why
    result = inspect(path)
    assert result.returncode == 0, result.stderr
    assert f"{name}.safetensors:" in result.stdout


@pytest.mark.parametrize("name,data,expected", STRICTER, ids=[c[0] for c in STRICTER])
def test_deliberately_stricter_than_python(tmp_path, name, data, expected):
    path = write(tmp_path, name, data)
    assert python_opens(path), "Python's safetensors rejects it"
    assert_rejected(path, expected)


@pytest.mark.parametrize("n", [100_000_001, 100 * 1024 * 1024])
def test_header_length_above_the_references_100_000_000_cap(tmp_path, n):
    # A real, parseable header of n bytes: JSON padded with spaces.
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + b"{}")
        f.write(b" " * (n - 2))
    ok, why = python_loads(str(path))
    assert not ok and "too large" in why, why
    assert_rejected(str(path), "exceeds the maximum 100000000")
