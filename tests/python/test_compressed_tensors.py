"""compressed-tensors output, read by a numpy reader written here from the compressed-tensors
specification (torch does not fit CI): every scheme unpacks to exactly the values of the same
job's dequantized safetensors output, and config.json carries the quantization_config that
llm-compressor would write."""

import json

import numpy as np
import pytest

from shardpress_helpers import from_f32, read_dir, shardpress, to_f32


def unpack_int32(packed, num_bits, length, axis):
    """compressed-tensors' unpack_from_int32: 32/num_bits unsigned codes per word, the first in
    the lowest bits, minus 2^(num_bits-1) to give signed values."""
    words = packed.view(np.uint32)
    pack_factor = 32 // num_bits
    mask = (1 << num_bits) - 1
    parts = [(words >> (num_bits * i)) & mask for i in range(pack_factor)]
    stacked = np.stack(parts, axis=axis + 1)  # each word's codes next to each other
    shape = list(words.shape)
    shape[axis] *= pack_factor
    unpacked = stacked.reshape(shape)
    unpacked = unpacked[:, :length] if axis == 1 else unpacked[:length, :]
    return unpacked.astype(np.int32) - (1 << (num_bits - 1))


E4M3 = np.array([
    (-1.0) ** (b >> 7) * (2.0 ** (((b >> 3) & 15) - 7) * (1 + (b & 7) / 8) if (b >> 3) & 15
                          else 2.0 ** -6 * (b & 7) / 8)
    for b in range(256)], dtype=np.float32)
E4M3[0x7F] = E4M3[0xFF] = np.nan


def dequantize(ct, module, weights, dtype):
    """Rebuilds `module.weight` from a compressed-tensors checkpoint, from the specification."""
    scale_dtype, scale = ct[f"{module}.weight_scale"]
    assert scale_dtype == dtype, "scales are stored in the model's dtype"
    scale = to_f32(scale_dtype, scale)
    if weights["type"] == "float":
        fp8_dtype, fp8 = ct[f"{module}.weight"]
        assert fp8_dtype == "F8_E4M3" and weights["num_bits"] == 8
        return E4M3[fp8] * (scale if scale.ndim == 2 else scale[0])
    bits = weights["num_bits"]
    _, shape = ct[f"{module}.weight_shape"]
    rows, cols = (int(d) for d in shape)
    packed_dtype, packed = ct[f"{module}.weight_packed"]
    assert packed_dtype == "I32" and packed.shape == (rows, -(-cols // (32 // bits)))
    q = unpack_int32(packed, bits, cols, axis=1)
    groups = scale.shape[1]
    if weights["strategy"] == "group":
        assert groups == cols // weights["group_size"]
    else:
        assert groups == 1
    if weights["symmetric"]:
        assert f"{module}.weight_zero_point" not in ct
        zero = np.zeros((rows, groups), dtype=np.int32)
    else:
        _, zp = ct[f"{module}.weight_zero_point"]
        zero = unpack_int32(zp, bits, rows, axis=0)
    group_of_column = np.arange(cols) // (cols // groups)
    return (q - zero[:, group_of_column]).astype(np.float32) * scale[:, group_of_column]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    shardpress("gen-model", "--out", root / "model", "--size", "6MB", "--max-shard-mb", "2")
    (root / "model" / "chat_template.json").write_text('{"chat_template": "{{ messages }}"}')
    return root


SCHEMES = {
    "w4a16": dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128),
    "w4a16-asym": dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128),
    "w4a16-hqq": dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128),
    "2of4-w4a16": dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128),
    "w8a16": dict(num_bits=8, type="int", symmetric=True, strategy="channel", group_size=None),
    "fp8": dict(num_bits=8, type="float", symmetric=True, strategy="channel", group_size=None),
}


@pytest.mark.parametrize("recipe", SCHEMES)
def test_every_scheme_unpacks_to_the_dequantized_output_of_the_same_job(model, recipe):
    out_st, out_ct = model / f"{recipe}-st", model / f"{recipe}-ct"
    for out, fmt in ((out_st, "safetensors"), (out_ct, "compressed-tensors")):
        shardpress("run", "--workers", "2", "--model", model / "model", "--out", out,
                   "--recipe", recipe, "--format", fmt, "--task-budget-mb", "1")
    config = json.loads((out_ct / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    assert q["quantization_status"] == "compressed"
    expected_format = "float-quantized" if recipe == "fp8" else "pack-quantized"
    assert q["format"] == expected_format
    assert list(q["config_groups"]) == ["group_0"]
    group = q["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == expected_format
    assert group["input_activations"] is None and group["output_activations"] is None
    weights = group["weights"]
    for key, value in SCHEMES[recipe].items():
        assert weights[key] == value, (key, weights[key])
    assert weights["dynamic"] is False
    assert q["ignore"] == ["lm_head"], q["ignore"]
    assert config["architectures"] == ["LlamaForCausalLM"]

    dense = read_dir(out_st)
    ct = read_dir(out_ct)
    index = json.loads((out_ct / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ct)
    total = sum(a.nbytes for _, a in ct.values())
    assert index["metadata"]["total_size"] == total
    assert (out_ct / "chat_template.json").exists() and (out_ct / "manifest.json").exists()

    quantized = 0
    for name, (dtype, values) in dense.items():
        module = name.removesuffix(".weight")
        if f"{module}.weight_scale" in ct:
            got = from_f32(dtype, dequantize(ct, module, weights, dtype))
            assert got.shape == values.shape, name
            assert np.array_equal(got, values), f"{name}: differs from the dequantized output"
            quantized += 1
        else:
            assert ct[name][0] == dtype and np.array_equal(ct[name][1], values), name
    assert quantized >= 14, quantized

    # The CLI's figures are true on disk: the report's output bytes are the shards' sizes.
    report = json.loads((out_ct / "report.json").read_text())
    shards = sum(p.stat().st_size for p in out_ct.glob("*.safetensors"))
    assert report["summary"]["output_bytes"] == shards
    inputs = sum(p.stat().st_size for p in (model / "model").glob("*.safetensors"))
    assert shards < inputs * (0.75 if recipe.startswith("w4") else 0.9), (shards, inputs)


@pytest.mark.parametrize("recipe, reason", [
    ("hqq3", "4- or 8-bit"), ("kmeans4", "compressed-tensors layout"),
    ("2of4", "2:4 pruning alone")])
def test_a_recipe_the_format_cannot_hold_is_refused_at_submit_with_no_output(model, recipe, reason):
    out = model / f"refused-{recipe}"
    result = shardpress("run", "--workers", "1", "--model", model / "model", "--out", out,
                        "--recipe", recipe, "--format", "compressed-tensors", check=False)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert reason in message and "model.layers.0" in message, message
    assert "panicked" not in message
    assert not list(out.glob("*.safetensors")) and not (out / "manifest.json").exists()
