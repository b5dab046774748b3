"""Rewrites a generated Mixtral-shaped model (`shardpress gen-model --experts N`) as a Qwen2-MoE
or Qwen3-MoE checkpoint, so the GGUF comparison with llama.cpp (bench/gguf-vs-llama-cpp.sh,
LAYOUT=qwen2moe|qwen3moe) covers those architectures too: experts renamed to
`mlp.experts.E.{gate,up,down}_proj`, the router to `mlp.gate`; Qwen2-MoE gains a shared expert
(`mlp.shared_expert.*`, `mlp.shared_expert_gate` [1, hidden]) and q/k/v biases, Qwen3-MoE
q/k norms. The weights stay bit for bit; the added tensors are seeded random BF16.

Usage: python bench/moe_layout.py SRC DST qwen2moe|qwen3moe   (numpy only)"""
import json
import os
import re
import shutil
import struct
import sys

import numpy as np


def read_raw(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header, base = json.loads(data[8:8 + n]), 8 + n
    return {k: (v["dtype"], v["shape"], data[base + v["data_offsets"][0]:base + v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def main(src, dst, layout):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if not f.endswith("safetensors") and f not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(os.path.join(src, f), dst)
    cfg = json.load(open(os.path.join(src, "config.json")))
    tensors = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            tensors.update(read_raw(os.path.join(src, f)))
    rng = np.random.default_rng(0)

    def bf16(shape, scale=0.02):
        v = (rng.standard_normal(shape) * scale).astype(np.float32)
        return ("BF16", list(shape), (v.view(np.uint32) >> 16).astype(np.uint16).tobytes())

    new = {}
    for k, v in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.block_sparse_moe\.(.*)", k)
        if m:
            rest = re.sub(r"\.w1\.", ".gate_proj.", "." + m.group(2))
            rest = re.sub(r"\.w2\.", ".down_proj.", rest)
            rest = re.sub(r"\.w3\.", ".up_proj.", rest)
            k = f"model.layers.{m.group(1)}.mlp{rest}"
        new[k] = v
    hidden, head_dim = cfg["hidden_size"], cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * head_dim
    shared = 512
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        if layout == "qwen2moe":
            new[p + "mlp.shared_expert.gate_proj.weight"] = bf16((shared, hidden))
            new[p + "mlp.shared_expert.up_proj.weight"] = bf16((shared, hidden))
            new[p + "mlp.shared_expert.down_proj.weight"] = bf16((hidden, shared))
            new[p + "mlp.shared_expert_gate.weight"] = bf16((1, hidden))
            for name, rows in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)):
                new[p + f"self_attn.{name}.bias"] = bf16((rows,))
        else:
            for name in ("q_norm", "k_norm"):
                new[p + f"self_attn.{name}.weight"] = bf16((head_dim,), 0.1)
    names = sorted(new)
    header, offset = {}, 0
    for k in names:
        dtype, shape, raw = new[k]
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    encoded = json.dumps(header).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    with open(os.path.join(dst, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for k in names:
            f.write(new[k][2])
    experts = cfg.pop("num_local_experts")
    common = {"num_experts": experts, "moe_intermediate_size": cfg["intermediate_size"],
              "decoder_sparse_step": 1, "mlp_only_layers": [], "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6}
    if layout == "qwen2moe":
        cfg.pop("head_dim")
        cfg.update(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                   shared_expert_intermediate_size=shared, norm_topk_prob=False, **common)
    else:
        cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                   norm_topk_prob=True, **common)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[3] not in ("qwen2moe", "qwen3moe"):
        sys.exit(__doc__)
    main(*sys.argv[1:])
