"""`--format gguf` end to end: a real job's model.gguf, read with gguf-py (llama.cpp's own Python
GGUF library), holds every tensor of the input under the name llama.cpp's converter gives it,
with the type llama.cpp's rules choose for the file type, the converter's Q/K row permutation,
and values that dequantize to exactly the same job's `--format safetensors` output; the
metadata is the converter's; the report and manifest account for the file; and what GGUF cannot
hold is refused at submit.

    SHARDPRESS_BIN=target/debug/shardpress pytest tests/python/test_gguf_job.py
"""

import json
import os
import re
import shutil

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from shardpress_helpers import field_value, from_f32, read_dir, shardpress, to_f32


# ----------------------------------------------------------------------------------------------
# llama.cpp's decisions, written here from convert_hf_to_gguf.py and llama-quantize.

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
LAYER_MODULES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOP_LEVEL = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf_name):
    if hf_name in TOP_LEVEL:
        return TOP_LEVEL[hf_name]
    m = LAYER.match(hf_name)
    assert m and m.group(2) in LAYER_MODULES, f"the test model has an unexpected {hf_name}"
    return f"blk.{m.group(1)}.{LAYER_MODULES[m.group(2)]}.weight"


def permutation(rows, n_head):
    """The converter's LlamaModel.permute as rows: out[r] = in[perm[r]]."""
    d = rows // n_head
    h, j, t = np.meshgrid(np.arange(n_head), np.arange(d // 2), np.arange(2), indexing="ij")
    return (h * d + t * (d // 2) + j).reshape(-1)


def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


RECIPES = {  # recipe -> (general.file_type, default 2-D type)
    "q8_0": (7, T.Q8_0),
    "q4_0": (2, T.Q4_0),
    "q4_k_m": (15, T.Q4_K),
    "q6_k": (18, T.Q6_K),
}


def expected_type(recipe, name, shape, n_layers):
    """llama.cpp's type for a tensor of the test model (every row a multiple of 256, so no
    fallbacks; separate output.weight; not a 70B)."""
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return T.F32
    default = RECIPES[recipe][1]
    if recipe == "q8_0":  # convert_hf_to_gguf.py --outtype q8_0: every 2-D weight
        return T.Q8_0
    if name == "output.weight":
        return T.Q6_K
    layer = int(name.split(".")[1]) if name.startswith("blk.") else None
    if recipe == "q4_k_m" and ("attn_v" in name or "ffn_down" in name):
        return T.Q6_K if use_more_bits(layer, n_layers) else T.Q4_K
    return default


# Largest relative Frobenius error of the GGUF values against the input, per type: loose, but a
# wrong permutation or a mixed-up tensor is off by ~1.4.
ERROR_BOUND = {T.Q8_0: 0.02, T.Q6_K: 0.04, T.Q4_K: 0.1, T.Q4_0: 0.12, T.F32: 0.0}

# Types for which gguf-py has a numpy reference quantizer that is bit-exact with ggml's.
REFERENCE_QUANTIZERS = {T.Q8_0, T.Q4_0}


# ----------------------------------------------------------------------------------------------
# Fixtures.

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-job")
    shardpress("gen-model", "--out", root / "model", "--size", "6MB", "--max-shard-mb", "2")
    return root


@pytest.fixture(scope="module")
def inputs(model):
    config = json.loads((model / "model" / "config.json").read_text())
    return config, read_dir(model / "model")


@pytest.fixture(scope="module", params=list(RECIPES))
def job(request, model):
    """(recipe, gguf output dir, safetensors output dir) of the same recipe on the same model."""
    recipe = request.param
    out_gguf, out_st = model / f"{recipe}-gguf", model / f"{recipe}-st"
    for out, fmt in ((out_gguf, "gguf"), (out_st, "safetensors")):
        shardpress("run", "--workers", "2", "--model", model / "model", "--out", out,
                   "--recipe", recipe, "--format", fmt)
    return recipe, out_gguf, out_st


# ----------------------------------------------------------------------------------------------
# Tests.

def test_every_tensor_is_mapped_typed_permuted_and_dequantizes_to_the_safetensors_output(
        job, inputs):
    recipe, out_gguf, out_st = job
    config, source = inputs
    n_layers = config["num_hidden_layers"]
    assert (out_gguf / "model.gguf").is_file()
    assert not (out_gguf / ".gguf-parts").exists(), "leftover .gguf-parts/"
    assert not list(out_gguf.glob("*.safetensors"))

    reader = gguf.GGUFReader(out_gguf / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(reader.tensors), "duplicate tensor names"
    expected_names = {gguf_name(n): n for n in source}
    assert set(tensors) == set(expected_names), (
        f"missing {sorted(set(expected_names) - set(tensors))}, "
        f"unexpected {sorted(set(tensors) - set(expected_names))}")

    dense = read_dir(out_st)
    assert set(dense) == set(source)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    types_seen = set()
    for name, t in tensors.items():
        hf = expected_names[name]
        dtype, raw_in = source[hf]
        st_dtype, st_values = dense[hf]
        assert st_dtype == dtype == "BF16", hf
        shape = tuple(raw_in.shape)
        # GGUF stores dims innermost first; gguf-py reports them as stored.
        assert tuple(int(d) for d in reversed(t.shape)) == shape, (name, t.shape, shape)
        want = expected_type(recipe, name, shape, n_layers)
        assert t.tensor_type == want, f"{name}: {t.tensor_type.name}, expected {want.name}"
        types_seen.add(t.tensor_type)

        values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        assert values.shape == shape, (name, values.shape, shape)
        kind = name.split(".")[-2]
        if kind in heads:  # back to Hugging Face row order
            perm = permutation(shape[0], heads[kind])
            hf_order = np.empty_like(values)
            hf_order[perm] = values
        else:
            hf_order = values
        original = to_f32(dtype, raw_in)

        if t.tensor_type == T.F32:
            # Stored unquantized: exactly the input values.
            assert np.array_equal(hf_order.view(np.uint32), original.view(np.uint32)), name
        else:
            rel = np.linalg.norm(hf_order - original) / np.linalg.norm(original)
            assert rel <= ERROR_BOUND[t.tensor_type], (
                f"{name} ({t.tensor_type.name}): relative error {rel:.4g} against the input")
        got = from_f32(dtype, hf_order)
        assert np.array_equal(got, st_values), (
            f"{name} ({t.tensor_type.name}): dequantized GGUF differs from the safetensors "
            f"output in {int(np.sum(got != st_values))} of {got.size} values")

        if t.tensor_type in REFERENCE_QUANTIZERS:
            # llama.cpp quantizes the converter's (permuted) rows; bit-exact references exist.
            permuted = original[permutation(shape[0], heads[kind])] if kind in heads else original
            reference = gguf.quants.quantize(permuted, t.tensor_type)
            assert reference.tobytes() == t.data.tobytes(), (
                f"{name}: {t.tensor_type.name} bytes differ from gguf-py's reference quantizer")

    assert T.F32 in types_seen and RECIPES[recipe][1] in types_seen, types_seen
    if recipe == "q4_k_m":
        assert T.Q6_K in types_seen, "q4_k_m mixes in Q6_K (output, use_more_bits layers)"


def test_metadata_is_the_converters(job, inputs, model):
    recipe, out_gguf, _ = job
    config, _ = inputs
    reader = gguf.GGUFReader(out_gguf / "model.gguf")
    fields = reader.fields
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    expect = {
        "general.architecture": (V.STRING, "llama"),
        "general.file_type": (V.UINT32, RECIPES[recipe][0]),
        "general.quantization_version": (V.UINT32, 2),
        "llama.block_count": (V.UINT32, config["num_hidden_layers"]),
        "llama.context_length": (V.UINT32, config["max_position_embeddings"]),
        "llama.embedding_length": (V.UINT32, config["hidden_size"]),
        "llama.feed_forward_length": (V.UINT32, config["intermediate_size"]),
        "llama.attention.head_count": (V.UINT32, config["num_attention_heads"]),
        "llama.attention.head_count_kv": (V.UINT32, config["num_key_value_heads"]),
        "llama.vocab_size": (V.UINT32, config["vocab_size"]),
        "llama.rope.dimension_count": (V.UINT32, head_dim),
        "llama.rope.freq_base": (V.FLOAT32, float(np.float32(config["rope_theta"]))),
        "llama.attention.layer_norm_rms_epsilon":
            (V.FLOAT32, float(np.float32(config["rms_norm_eps"]))),
        "tokenizer.ggml.model": (V.STRING, "gpt2"),
        "tokenizer.ggml.pre": (V.STRING, "llama-bpe"),
        "tokenizer.ggml.bos_token_id": (V.UINT32, config["bos_token_id"]),
        "tokenizer.ggml.eos_token_id": (V.UINT32, config["eos_token_id"]),
    }
    for key, (vtype, value) in expect.items():
        assert key in fields, f"missing {key}"
        assert fields[key].types[0] == vtype, (key, fields[key].types)
        assert field_value(fields[key]) == value, (key, field_value(fields[key]), value)
    assert field_value(fields["GGUF.version"]) == 3

    # The vocabulary, id by id, as get_vocab_base lists it from tokenizer.json.
    tokenizer = json.loads((model / "model" / "tokenizer.json").read_text())
    vocab_size = config["vocab_size"]
    by_id = {i: tok for tok, i in tokenizer["model"]["vocab"].items()}
    added = {a["id"]: a for a in tokenizer["added_tokens"]}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens = field_value(fields["tokenizer.ggml.tokens"])
    assert len(tokens) == vocab_size
    assert tokens == [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_type = field_value(fields["tokenizer.ggml.token_type"])
    assert token_type == [3 if i in added and added[i]["special"] else 1 for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    assert field_value(fields["tokenizer.ggml.merges"]) == merges


def test_report_and_manifest_account_for_the_file(job):
    _, out_gguf, _ = job
    size = os.path.getsize(out_gguf / "model.gguf")
    report = json.loads((out_gguf / "report.json").read_text())
    assert report["format"] == "gguf", report["format"]
    assert report["summary"]["output_bytes"] == size, (report["summary"]["output_bytes"], size)

    manifest = json.loads((out_gguf / "manifest.json").read_text())
    objects = {o["name"]: o for o in manifest["objects"]}
    assert "model.gguf" in objects, list(objects)
    assert objects["model.gguf"]["size"] == size
    assert not [n for n in objects if ".gguf-parts" in n or n.endswith(".safetensors")], list(objects)
    for name, entry in objects.items():
        assert (out_gguf / name).is_file(), name
        assert os.path.getsize(out_gguf / name) == entry["size"], name
    shardpress("verify", out_gguf)


def _copy_model(model, name, edit):
    target = model / name
    if not target.exists():
        shutil.copytree(model / "model", target)
        edit(target)
    return target


def _drop_tokenizer(d):
    (d / "tokenizer.json").unlink()


def _make_bert(d):
    config = json.loads((d / "config.json").read_text())
    config.update(architectures=["BertModel"], model_type="bert")
    (d / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case, recipe, reasons", [
    ("recipe", "w4a16", ("gguf", "w4a16")),
    ("no-tokenizer", "q4_k_m", ("tokenizer.json",)),
    ("bert", "q4_k_m", ("architecture", "bertmodel")),
])
def test_what_gguf_cannot_hold_is_refused_at_submit_with_no_output(model, case, recipe, reasons):
    source = {
        "recipe": lambda: model / "model",
        "no-tokenizer": lambda: _copy_model(model, "no-tokenizer", _drop_tokenizer),
        "bert": lambda: _copy_model(model, "bert", _make_bert),
    }[case]()
    out = model / f"refused-{case}"
    result = shardpress("run", "--workers", "1", "--model", source, "--out", out,
                        "--recipe", recipe, "--format", "gguf", check=False)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    for reason in reasons:
        assert reason in message.lower(), (reason, message)
    assert "panicked" not in message, message
    assert not (out / "model.gguf").exists() and not (out / "manifest.json").exists()
    assert not (out / ".gguf-parts").exists()


WIDTH_TYPES = {4: T.Q4_K, 5: T.Q5_K, 6: T.Q6_K, 8: T.Q8_0}


def test_a_bit_budget_gives_each_tensor_its_measured_type(model, inputs):
    """q4_k_m with --target-bpw 5: each block-quantized tensor gets the type of the width the
    measuring round chose for it (Q4_K, Q5_K, Q6_K or Q8_0), norms stay F32, the budget is met
    by the bytes in the file, and the GGUF dequantizes to the safetensors output of the same
    job (the same choice whatever the format)."""
    config, source = inputs
    outs, printed = {}, {}
    for fmt in ("gguf", "safetensors"):
        outs[fmt] = model / f"budget-{fmt}"
        printed[fmt] = shardpress(
            "run", "--workers", "2", "--model", model / "model", "--out", outs[fmt],
            "--recipe", "q4_k_m", "--format", fmt, "--target-bpw", "5").stdout
    report = json.loads((outs["gguf"] / "report.json").read_text())
    mixed = report["mixed_precision"]
    # The summary counts the block types stored.
    line = next(l for l in printed["gguf"].splitlines() if l.startswith("mixed prec."))
    counted = {ty: int(n) for ty, n in re.findall(r"(Q\d_[K0-9]) x(\d+)", line)}
    assert sum(counted.values()) == len(mixed["tensors"]), line
    widths = {t["name"]: t["bits"] for t in mixed["tensors"]}
    assert widths == {t["name"]: t["bits"] for t in json.loads(
        (outs["safetensors"] / "report.json").read_text())["mixed_precision"]["tensors"]}

    reader = gguf.GGUFReader(outs["gguf"] / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    dense = read_dir(outs["safetensors"])
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    stored_bits, params, types_seen = 0, 0, set()
    for hf, (dtype, raw_in) in source.items():
        t = tensors[gguf_name(hf)]
        types_seen.add(t.tensor_type)
        if hf in widths:
            assert t.tensor_type == WIDTH_TYPES[widths[hf]], (hf, t.tensor_type.name, widths[hf])
            stored_bits += 8 * int(t.n_bytes)
            params += int(raw_in.size)
        else:
            assert t.tensor_type == T.F32 and raw_in.ndim == 1, (hf, t.tensor_type.name)
        values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        kind = t.name.split(".")[-2]
        if kind in heads:
            hf_order = np.empty_like(values)
            hf_order[permutation(values.shape[0], heads[kind])] = values
            values = hf_order
        assert np.array_equal(from_f32(dtype, values), dense[hf][1]), hf
    assert len(types_seen & set(WIDTH_TYPES.values())) >= 2, types_seen
    assert abs(stored_bits / params - mixed["bits_per_weight"]) < 1e-9, (
        stored_bits / params, mixed["bits_per_weight"])
    assert mixed["bits_per_weight"] <= 5.0
