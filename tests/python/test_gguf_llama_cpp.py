"""llama.cpp itself (llama-cpp-python, built from its PyPI sdist) loads the GGUF files the cluster
writes and runs them, and its logits equal an independent reference: a Llama forward pass written
here in numpy from the Hugging Face definition, on the Hugging Face checkpoint's weights.

The F32 file holds exactly the input's values, so llama.cpp must agree with the reference to
float rounding: this checks what a runtime depends on beyond the tensor bytes (tensor names,
the Q/K row permutation against llama.cpp's rotary embedding, head counts, rope theta, norm
epsilon). The quantized files are compared with the same forward pass on the weights gguf-py
dequantizes from them (llama.cpp also quantizes activations to 8 bits inside its quantized
matrix products, hence the looser bound). A Mixtral-shaped model checks the experts, which the
converter stacks into one 3-D tensor per projection and layer."""

import json
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from shardpress_helpers import read_dir, shardpress, to_f32

TOKENS = [5, 17, 300, 42, 1000, 7, 7, 256, 1999, 64, 3, 128]

F32_RECIPE = """name: gguf-f32
format: gguf
passes:
  - gguf: { type: f32 }
    targets: ['re:.*\\.weight$']
"""


def read_bf16_model(directory: Path):
    """Every tensor of the folder's safetensors files as f32."""
    out = {}
    for name, (dtype, raw) in read_dir(directory).items():
        assert dtype == "BF16", name
        out[name] = to_f32(dtype, raw).reshape(raw.shape)
    return out


def unpermute(w, n_head):
    """Inverse of convert_hf_to_gguf's LlamaModel.permute on the rows."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def read_gguf_as_hf(path: Path, config):
    """The weights llama.cpp computes with, under Hugging Face names and row order."""
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    modules = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
               "ffn_gate_inp": "block_sparse_moe.gate"}
    experts = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if t.name in names:
            hf = names[t.name]
        else:
            _, layer, module, suffix = t.name.split(".")
            if module in experts:
                for e, slice_ in enumerate(w):
                    out[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{experts[module]}.{suffix}"] = slice_
                continue
            hf = f"model.layers.{layer}.{modules[module]}.{suffix}"
        if hf.endswith("q_proj.weight"):
            w = unpermute(w, config["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            w = unpermute(w, config["num_key_value_heads"])
        out[hf] = w
    return out


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def swiglu(x, w, gate, up, down):
    g, u = x @ w[gate].T, x @ w[up].T
    return (g / (1 + np.exp(-g)) * u) @ w[down].T


def llama_logits(w, config, tokens):
    """transformers' LlamaForCausalLM forward (eager attention, causal), in float64."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // n_head
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    t = len(tokens)
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    freqs = np.outer(np.arange(t), inv_freq)
    cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))

    def rope(x):  # x: [heads, t, hd]
        rotated = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + rotated * sin

    h = w["model.embed_tokens.weight"][tokens]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).reshape(t, n_head, hd).transpose(1, 0, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).reshape(t, n_kv, hd).transpose(1, 0, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(t, n_kv, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, n_head // n_kv, axis=0), np.repeat(v, n_head // n_kv, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (scores / scores.sum(-1, keepdims=True)) @ v
        h = h + attn.transpose(1, 0, 2).reshape(t, n_head * hd) @ w[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        if "num_local_experts" not in config:
            h = h + swiglu(x, w, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight",
                           p + "mlp.down_proj.weight")
            continue
        # Mixtral's sparse MoE block: softmax over the router, the top k renormalized.
        router = x @ w[p + "block_sparse_moe.gate.weight"].T
        probs = np.exp(router - router.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :config["num_experts_per_tok"]]
        for row in range(t):
            chosen = probs[row, top[row]] / probs[row, top[row]].sum()
            for e, weight in zip(top[row], chosen):
                q = f"{p}block_sparse_moe.experts.{e}."
                h[row] += weight * swiglu(x[row:row + 1], w, q + "w1.weight", q + "w3.weight",
                                          q + "w2.weight")[0]
    h = rms_norm(h, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return h @ head.T


def llama_cpp_logits(path: Path, tokens):
    # An F32 KV cache, so that only the weights' and activations' arithmetic differ.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float64)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-cpp")
    shardpress("gen-model", "--out", root / "model", "--size", "6MB", "--max-shard-mb", "2")
    return root


def run_gguf(model, recipe):
    """The job's file, made once per module (a finished output is not written over)."""
    out = model / f"out-{Path(recipe).stem}"
    if not (out / "manifest.json").exists():
        shardpress("run", "--workers", "2", "--model", model / "model", "--out", out,
                   "--recipe", recipe, "--format", "gguf")
    return out / "model.gguf"


def test_llama_cpp_runs_the_f32_file_exactly_as_the_reference_forward_pass(model):
    (model / "f32.yaml").write_text(F32_RECIPE)
    path = run_gguf(model, model / "f32.yaml")
    config = json.loads((model / "model" / "config.json").read_text())
    weights = read_bf16_model(model / "model")
    # The file holds the input's values, rows permuted as the converter does.
    stored = read_gguf_as_hf(path, config)
    assert stored.keys() == weights.keys()
    for name, w in weights.items():
        assert np.array_equal(stored[name], w), name
    want = llama_logits(weights, config, TOKENS)
    got = llama_cpp_logits(path, TOKENS)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got))
    # f32 arithmetic in another order: agreement to float rounding (measured ~6e-7 of the
    # largest logit; Q rows left unpermuted give ~1.1), and the same argmax.
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale, np.abs(got - want).max() / scale
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("recipe", ["q8_0", "q4_k_m"])
def test_llama_cpp_runs_the_quantized_files_like_the_reference_on_their_weights(model, recipe):
    path = run_gguf(model, recipe)
    config = json.loads((model / "model" / "config.json").read_text())
    want = llama_logits(read_gguf_as_hf(path, config), config, TOKENS)
    got = llama_cpp_logits(path, TOKENS)
    assert np.all(np.isfinite(got))
    cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    # Measured: 0.9997 (q8_0), 0.9991 (q4_k_m); unpermuted Q rows give far less.
    assert cosine.min() > 0.998, cosine


def test_llama_cpp_loads_split_files_like_the_single_file(model):
    single = run_gguf(model, "q8_0")
    out = model / "out-split"
    shardpress("run", "--workers", "2", "--model", model / "model", "--out", out,
               "--recipe", "q8_0", "--format", "gguf", "--max-file-mb", "1")
    files = sorted(out.glob("model-*-of-*.gguf"))
    assert len(files) >= 2, files
    assert not (out / "model.gguf").exists()
    assert [f.name for f in files] == [f"model-{i:05d}-of-{len(files):05d}.gguf"
                                       for i in range(1, len(files) + 1)]
    # Together the split files hold exactly the single file's tensors, byte for byte.
    whole = {t.name: t.data.tobytes() for t in gguf.GGUFReader(single).tensors}
    parts = {t.name: t.data.tobytes() for f in files for t in gguf.GGUFReader(f).tensors}
    assert parts == whole
    # llama.cpp opens the first file, finds the others by name and computes the same logits.
    assert np.array_equal(llama_cpp_logits(files[0], TOKENS), llama_cpp_logits(single, TOKENS))


def test_llama_cpp_runs_a_mixture_of_experts_file_exactly_as_the_reference(tmp_path):
    """Experts across several tasks (1 MB budget) land in their stacked tensors in order."""
    shardpress("gen-model", "--out", tmp_path / "model", "--size", "12MB", "--experts", "4")
    (tmp_path / "f32.yaml").write_text(F32_RECIPE)
    out = tmp_path / "out"
    shardpress("run", "--workers", "3", "--model", tmp_path / "model", "--out", out,
               "--recipe", tmp_path / "f32.yaml", "--format", "gguf", "--task-budget-mb", "1")
    path = out / "model.gguf"
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    reader = gguf.GGUFReader(path)
    assert reader.fields["llama.expert_count"].contents() == 4
    assert reader.fields["llama.expert_used_count"].contents() == 2
    stacked = [t for t in reader.tensors if t.name.endswith("_exps.weight")]
    assert stacked and all(int(t.shape[2]) == 4 for t in stacked)
    weights = read_bf16_model(tmp_path / "model")
    stored = read_gguf_as_hf(path, config)
    assert stored.keys() == weights.keys()
    for name, w in weights.items():
        assert np.array_equal(stored[name], w), name
    want = llama_logits(weights, config, TOKENS)
    got = llama_cpp_logits(path, TOKENS)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale, np.abs(got - want).max() / scale
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
