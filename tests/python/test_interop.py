"""Python's own `safetensors` reads what a real shardpress cluster wrote: names, shapes and
dtypes match the input, the index covers every tensor, and int8 values stay within the
quantization bound of the originals."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

BIN = os.environ.get("SHARDPRESS_BIN", "target/debug/shardpress")


def shardpress(*args):
    result = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, f"shardpress {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def tensor_specs(directory: Path):
    """name -> (dtype, shape) for every tensor in every .safetensors file of a directory."""
    specs = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                specs[name] = (piece.get_dtype(), tuple(piece.get_shape()))
    return specs


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    shardpress("gen-model", "--out", root / "model", "--size", "6MB", "--max-shard-mb", "2")
    shardpress("run", "--workers", "2", "--model", root / "model", "--out", root / "out",
               "--recipe", "int4-g128", "--task-budget-mb", "1")
    return root / "model", root / "out"


def test_python_safetensors_reads_every_output_tensor_with_the_input_names_shapes_and_dtypes(bf16_run):
    model, out = bf16_run
    expected = tensor_specs(model)
    got = tensor_specs(out)
    assert len(expected) > 10
    assert got == expected


def test_the_index_maps_every_tensor_to_the_shard_that_holds_it(bf16_run):
    _, out = bf16_run
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), framework="numpy") as f:
            assert name in f.keys()
    assert set(index["weight_map"]) == set(tensor_specs(out))


def test_int8_values_loaded_by_python_stay_within_the_quantization_bound(tmp_path):
    shardpress("gen-model", "--out", tmp_path / "model", "--size", "3MB", "--dtype", "f16")
    shardpress("run", "--workers", "2", "--model", tmp_path / "model", "--out", tmp_path / "out",
               "--recipe", "int8")
    original = load_file(str(tmp_path / "model" / "model.safetensors"))
    output = {}
    for path in (tmp_path / "out").glob("*.safetensors"):
        output.update(load_file(str(path)))
    assert original.keys() == output.keys()
    checked = 0
    for name, x in original.items():
        y = output[name]
        assert y.dtype == np.float16 and y.shape == x.shape
        if x.ndim < 2 or "embed_tokens" in name or "lm_head" in name:
            assert np.array_equal(x, y), name
            continue
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        # int8 per-channel symmetric: |error| <= scale/2 per row, scale = absmax/127 (f16-rounded
        # up), plus the f16 rounding of the stored result.
        scale = np.abs(x32).max(axis=1, keepdims=True) / 127.0
        bound = scale * 0.5 * 1.001 + np.abs(y32) * 2.0**-11 + 1e-7
        assert np.all(np.abs(x32 - y32) <= bound), name
        assert not np.array_equal(x, y), f"{name} was not quantized"
        checked += 1
    assert checked >= 7
