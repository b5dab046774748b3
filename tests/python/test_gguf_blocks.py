"""gguf-py (llama.cpp's own Python GGUF library) reads the GGUF file shardpress writes: metadata,
tensor names, types and shapes match, gguf-py's dequantization of every tensor equals
shardpress's bit for bit, and where gguf-py has a reference quantizer (F32, F16, BF16, Q8_0,
Q4_0, Q5_0, Q5_1) its bytes equal shardpress's.

The file comes from the `gguf_fixture` example of shardpress-core; point SHARDPRESS_GGUF_FIXTURE
at the built executable:

    cargo build -p shardpress-core --example gguf_fixture
    SHARDPRESS_GGUF_FIXTURE=target/debug/examples/gguf_fixture pytest tests/python/test_gguf_blocks.py
"""

import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from shardpress_helpers import field_value

FIXTURE = os.environ.get("SHARDPRESS_GGUF_FIXTURE")

# name -> (type, row-major shape, largest relative Frobenius error vs the original values).
# All [8, 512] tensors hold the same values; row 4 of each 8 is tiny (std 2e-5), where ggml's
# f16 super-block scale underflows: Q6_K stores it as zeros (exactly as llama.cpp does).
TENSORS = {
    "blk.0.f32.weight": (T.F32, (8, 512), 0.0),
    "blk.0.f16.weight": (T.F16, (8, 512), 1e-4),
    "blk.0.q4_0.weight": (T.Q4_0, (8, 512), 0.05),
    "blk.0.q5_0.weight": (T.Q5_0, (8, 512), 0.04),
    "blk.0.q5_1.weight": (T.Q5_1, (8, 512), 0.05),
    "blk.0.q8_0.weight": (T.Q8_0, (8, 512), 0.02),
    "blk.0.q4_k.weight": (T.Q4_K, (8, 512), 0.05),
    "blk.0.q5_k.weight": (T.Q5_K, (8, 512), 0.04),
    "blk.0.q6_k.weight": (T.Q6_K, (8, 512), 0.03),
    "blk.0.bf16.weight": (T.BF16, (8, 512), 1e-3),
    "blk.1.q6_k_3d.weight": (T.Q6_K, (2, 3, 256), 0.03),
    "blk.1.q4_k_rows.weight": (T.Q4_K, (16, 256), 0.05),
}

# Types for which gguf-py has a numpy reference quantizer that is bit-exact with ggml's.
REFERENCE_QUANTIZERS = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1}


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    if not FIXTURE:
        pytest.fail(
            "SHARDPRESS_GGUF_FIXTURE is not set: run `cargo build -p shardpress-core --example "
            "gguf_fixture` and set it to the built executable "
            "(e.g. target/debug/examples/gguf_fixture)"
        )
    if not Path(FIXTURE).is_file():
        pytest.fail(f"SHARDPRESS_GGUF_FIXTURE={FIXTURE} is not a file")
    out = tmp_path_factory.mktemp("gguf")
    result = subprocess.run([FIXTURE, str(out)], capture_output=True, text=True)
    assert result.returncode == 0, f"gguf_fixture failed:\n{result.stdout}\n{result.stderr}"
    return out


@pytest.fixture(scope="module")
def reader(fixture_dir):
    return gguf.GGUFReader(fixture_dir / "blocks.gguf")


def f32_file(path):
    return np.fromfile(path, dtype="<f4")


def test_metadata_keys_and_values(reader):
    expect = {
        "general.architecture": (V.STRING, "llama"),
        "general.name": (V.STRING, "shardpress gguf fixture"),
        "shardpress.fixture.u32": (V.UINT32, 42),
        "shardpress.fixture.f32": (V.FLOAT32, 0.25),
        "shardpress.fixture.bool": (V.BOOL, True),
        "shardpress.fixture.strings": (V.ARRAY, ["alpha", "beta", "γάμμα"]),
        "shardpress.fixture.i32s": (V.ARRAY, [-1, 0, 7]),
    }
    # The reader adds its own GGUF.* pseudo-fields (version, counts).
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert keys == list(expect)
    for key, (vtype, value) in expect.items():
        field = reader.fields[key]
        assert field.types[0] == vtype, key
        assert field_value(field) == value, key
    assert field_value(reader.fields["GGUF.version"]) == 3
    assert reader.alignment == 32


def test_tensor_names_types_and_shapes(reader):
    assert [t.name for t in reader.tensors] == list(TENSORS)
    for t in reader.tensors:
        qtype, shape, _ = TENSORS[t.name]
        assert t.tensor_type == qtype, t.name
        # GGUF stores dims innermost first; the reader reports them as stored.
        assert [int(d) for d in t.shape] == list(reversed(shape)), t.name
        assert t.n_elements == int(np.prod(shape)), t.name
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        assert t.n_bytes == t.n_elements // block * type_size, t.name


def test_every_tensor_is_aligned_and_the_file_ends_after_the_last_padding(reader, fixture_dir):
    ends = []
    for t in reader.tensors:
        assert t.data_offset % 32 == 0, t.name
        ends.append(t.data_offset + (t.n_bytes + 31) // 32 * 32)
    assert [t.data_offset for t in reader.tensors[1:]] == ends[:-1]
    assert os.path.getsize(fixture_dir / "blocks.gguf") == ends[-1]


def test_gguf_py_dequantizes_to_exactly_our_values(reader, fixture_dir):
    for t in reader.tensors:
        qtype, shape, _ = TENSORS[t.name]
        theirs = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        assert theirs.shape == shape, t.name
        ours = f32_file(fixture_dir / f"{t.name}.f32")
        assert ours.size == theirs.size, t.name
        # Bitwise: the same IEEE operations in the same order give the same bits.
        assert np.array_equal(theirs.reshape(-1).view(np.uint32), ours.view(np.uint32)), t.name


def test_errors_against_the_original_values_are_small(fixture_dir):
    for name, (qtype, shape, bound) in TENSORS.items():
        src = f32_file(fixture_dir / f"{name}.src.f32")
        deq = f32_file(fixture_dir / f"{name}.f32")
        assert src.size == int(np.prod(shape)), name
        assert np.all(np.isfinite(deq)), name
        rel = np.linalg.norm(deq - src) / np.linalg.norm(src)
        assert rel <= bound, f"{name}: relative error {rel:.4g} > {bound}"
        # The all-zero rows (row 1 of every 8) stay exactly zero.
        rows = src.reshape(-1, shape[-1])
        zero_rows = np.all(rows == 0, axis=1)
        assert zero_rows.any(), name
        assert np.all(deq.reshape(-1, shape[-1])[zero_rows] == 0), name


def test_our_bytes_equal_gguf_py_reference_quantizers(reader, fixture_dir):
    checked = set()
    for t in reader.tensors:
        qtype, shape, _ = TENSORS[t.name]
        if qtype not in REFERENCE_QUANTIZERS:
            continue
        src = f32_file(fixture_dir / f"{t.name}.src.f32").reshape(shape)
        theirs = gguf.quants.quantize(src, qtype)
        assert theirs.tobytes() == t.data.tobytes(), t.name
        checked.add(qtype)
    assert checked == REFERENCE_QUANTIZERS
