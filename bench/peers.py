"""Helper of bench/peers.sh: prepares the inputs, measures the Python-side peers, prints the table.

Subcommands (all paths explicit, results appended as JSON lines to --results):
  prepare  --model DIR --minilm FILE --work DIR --subset-mb N
      writes WORK/gen.bf16.bin (the generated model's safetensors data section),
      WORK/minilm.f32.bin (MiniLM's F32 tensors), WORK/minilm.bf16.bin (the same rounded to
      BF16, round-to-nearest-even), WORK/codes.u8.bin (RTN int4 group-128 codes of the generated
      model's projection matrices, one byte per code), and WORK/subset.safetensors +
      WORK/subset.gguf: the first whole layers' 2-D projection matrices (about N MB of BF16),
      the same bytes for shardpress and llama-quantize.
  measure  --work DIR --results FILE --repeat N
      zstd -3 (libzstd through the `zstandard` package, in memory, one thread; and the zstd
      CLI, `-3 -T1`, file to /dev/null) and ZipNN (threads=1) on each .bin input.
  gguf-error --quantized FILE --reference FILE
      prints the relative Frobenius error, over all tensors, of a llama-quantize output
      (dequantized with the gguf package) against the BF16 GGUF it was made from.
  report   --results FILE
      prints the markdown tables.

All rates are MB/s (10^6 bytes) of the *original* bytes, best of --repeat runs.
"""

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types

import numpy as np

# The inputs: (file, label, dtype of the bytes, layout name of our entropy coder).
INPUTS = [
    ("gen.bf16.bin", "generated Llama-shaped BF16", "bfloat16", "bf16"),
    ("minilm.f32.bin", "MiniLM-L6 FP32 (real)", "float32", "f32"),
    ("minilm.bf16.bin", "MiniLM-L6 rounded to BF16", "bfloat16", "bf16"),
    ("codes.u8.bin", "int4 codes (RTN g128 of the generated model, 1 byte/code)", "uint8", "bytes"),
]

# GGUF names of the seven projection matrices of a Llama layer.
GGUF_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

# Tensors the shardpress presets quantize (same rule as core/src/recipe.rs `weights!`).
TARGETED = re.compile(r".*\.weight$")
IGNORED = re.compile(r"(?i).*(embed|lm_head|norm).*")


def log(msg):
    print(f"[peers.py] {msg}", file=sys.stderr, flush=True)


def read_safetensors(path):
    """(header dict without __metadata__, absolute offset of the data section)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def model_files(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, x) for x in files]
    return [os.path.join(model_dir, "model.safetensors")]


def tensors_in_order(path):
    header, start = read_safetensors(path)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return items, start


def load_tensor(mm, start, info):
    b, e = info["data_offsets"]
    return mm[start + b : start + e]


def f32_to_bf16(x):
    """Round-to-nearest-even FP32 -> BF16 bits (finite input)."""
    u = x.astype(np.float32, copy=False).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def rtn_int4_g128_codes(values, row_len):
    """Symmetric RTN int4, groups of 128 along rows: q = clip(round(x/s), -8, 7) + 8, s = absmax/7."""
    g = values.reshape(-1, 128) if row_len % 128 == 0 else None
    if g is None:
        raise SystemExit(f"row length {row_len} is not a multiple of 128")
    scale = np.abs(g).max(axis=1, keepdims=True) / np.float32(7.0)
    safe = np.where(scale == 0, np.float32(1.0), scale)
    q = np.clip(np.rint(g / safe), -8, 7) + 8
    return q.astype(np.uint8).reshape(-1)


def prepare(args):
    os.makedirs(args.work, exist_ok=True)
    files = model_files(args.model)
    # (a) the generated model's data sections, concatenated; (d) codes of its projections.
    t0 = time.perf_counter()
    with open(os.path.join(args.work, "gen.bf16.bin"), "wb") as out_data, open(
        os.path.join(args.work, "codes.u8.bin"), "wb"
    ) as out_codes:
        for path in files:
            items, start = tensors_in_order(path)
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            with open(path, "rb") as f:
                f.seek(start)
                shutil.copyfileobj(f, out_data, 16 << 20)
            for name, info in items:
                if info["dtype"] != "BF16" or len(info["shape"]) != 2:
                    continue
                if not TARGETED.match(name) or IGNORED.match(name):
                    continue
                bits = load_tensor(mm, start, info).view(np.uint16)
                out_codes.write(rtn_int4_g128_codes(bf16_to_f32(bits), info["shape"][1]).tobytes())
    log(f"generated model data + int4 codes written in {time.perf_counter() - t0:.1f}s")

    # (b), (c) MiniLM FP32 tensors and their BF16 rounding.
    header, start = read_safetensors(args.minilm)
    dtypes = sorted({v["dtype"] for v in header.values()})
    mm = np.memmap(args.minilm, dtype=np.uint8, mode="r")
    f32 = [load_tensor(mm, start, info) for _, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]) if info["dtype"] == "F32"]
    f32 = np.concatenate(f32)
    f32.tofile(os.path.join(args.work, "minilm.f32.bin"))
    f32_to_bf16(f32.view(np.float32)).tofile(os.path.join(args.work, "minilm.bf16.bin"))
    log(f"MiniLM: dtypes {dtypes}, {f32.size / 1e6:.1f} MB of F32 kept")

    # The subset for llama-quantize and our quantizers: the first whole layers.
    path = files[0]
    items, start = tensors_in_order(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    layers = {}
    for name, info in items:
        m = re.match(r"model\.layers\.(\d+)\.(.*)$", name)
        if m and m.group(2) in GGUF_NAMES:
            layers.setdefault(int(m.group(1)), []).append((name, m.group(2), info))
    chosen, total = [], 0
    for layer in sorted(layers):
        size = sum(info["data_offsets"][1] - info["data_offsets"][0] for _, _, info in layers[layer])
        if chosen and total + size > args.subset_mb * 1e6:
            break
        chosen.append(layer)
        total += size
    write_subset(args.work, mm, start, layers, chosen, config)
    with open(os.path.join(args.work, "subset.bytes"), "w") as f:
        f.write(str(total))
    log(f"subset: layers {chosen[0]}..{chosen[-1]} ({len(chosen)} layers, {total / 1e6:.1f} MB BF16)")


def write_subset(work, mm, start, layers, chosen, config):
    import gguf

    st_header, blobs, offset = {}, [], 0
    writer = gguf.GGUFWriter(os.path.join(work, "subset.gguf"), "llama")
    hidden = config["hidden_size"]
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(len(chosen))
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(hidden // config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    for new_index, layer in enumerate(chosen):
        for name, short, info in layers[layer]:
            raw = np.asarray(load_tensor(mm, start, info))
            bits = raw.view(np.uint16).reshape(info["shape"])
            writer.add_tensor(f"blk.{new_index}.{GGUF_NAMES[short]}", bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
            st_name = f"model.layers.{new_index}.{short}"
            st_header[st_name] = {"dtype": "BF16", "shape": info["shape"], "data_offsets": [offset, offset + raw.size]}
            offset += raw.size
            blobs.append(raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    head = json.dumps(st_header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(os.path.join(work, "subset.safetensors"), "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b.tobytes())


def best_of(repeat, fn):
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def import_zipnn():
    """ZipNN imports torch at module level but its byte API never calls it: without torch
    installed, a stub module stands in (announced on stderr)."""
    try:
        import torch  # noqa: F401

        note = "real torch"
    except ImportError:

        class _Any:
            def __init__(self, name):
                self._name = name

            def __getattr__(self, key):
                if key.startswith("__"):
                    raise AttributeError(key)
                return _Any(f"{self._name}.{key}")

            def __call__(self, *a, **k):
                # `@torch.jit.script` at import time: return the function unchanged. Any real
                # call into torch fails loudly, so a code path that needs torch cannot run on
                # the stub unnoticed.
                if len(a) == 1 and callable(a[0]) and not k:
                    return a[0]
                raise RuntimeError(f"{self._name}() called, but torch is a stub here (PEERS_REAL_TORCH=1 installs torch)")

            def __mro_entries__(self, bases):
                return (object,)

        class _Torch(types.ModuleType):
            __version__ = "0.0.0+stub"

            def __getattr__(self, key):
                if key.startswith("__"):
                    raise AttributeError(key)
                return _Any(f"torch.{key}")

        sys.modules["torch"] = _Torch("torch")
        note = "torch stub (byte API: numpy + zipnn_core C extension only)"
        log("WARNING: torch is not installed; ZipNN runs with a torch stub (its byte API uses only numpy and its C extension; PEERS_REAL_TORCH=1 installs torch)")
    from zipnn import ZipNN

    return ZipNN, note


def measure(args):
    import zstandard

    results = open(args.results, "a")

    def emit(**row):
        results.write(json.dumps(row) + "\n")
        results.flush()
        log(json.dumps(row))

    def skipped(what, why):
        log(f"WARNING: skipping {what}: {why}")
        emit(kind="skipped", what=what, why=why)

    try:
        ZipNN, zipnn_note = import_zipnn()
        zipnn_version = importlib.metadata.version("zipnn")
    except Exception as e:  # not installed, or needs more of torch than the stub offers
        ZipNN = None
        skipped("ZipNN", f"cannot be imported ({type(e).__name__}: {e})")
    zstd_cli = shutil.which("zstd")
    if not zstd_cli:
        skipped("zstd CLI", "no zstd on PATH (libzstd through python zstandard is still measured)")

    for file, label, dtype, _ in INPUTS:
        path = os.path.join(args.work, file)
        with open(path, "rb") as f:
            data = f.read()
        n = len(data)
        # zstd -3 in memory, one thread (libzstd via python zstandard).
        cctx = zstandard.ZstdCompressor(level=3, threads=0)
        dctx = zstandard.ZstdDecompressor()
        tc, comp = best_of(args.repeat, lambda: cctx.compress(data))
        td, back = best_of(args.repeat, lambda: dctx.decompress(comp, max_output_size=n))
        assert back == data, "zstd round trip"
        emit(kind="lossless", input=file, label=label, codec=f"zstd -3 (libzstd {zstandard.ZSTD_VERSION[0]}.{zstandard.ZSTD_VERSION[1]}.{zstandard.ZSTD_VERSION[2]}, in memory)", bytes=n, compressed=len(comp), compress_mbps=n / 1e6 / tc, decompress_mbps=n / 1e6 / td)
        del back
        if zstd_cli:
            # The CLI's own archive (untimed) gives its size (frame with checksum) and is what
            # the timed decompression reads; the timed runs write to /dev/null.
            zpath = os.path.join(args.work, file + ".zst")
            subprocess.run([zstd_cli, "-3", "-T1", "-q", "-f", "-o", zpath, path], check=True)
            cli_size = os.path.getsize(zpath)
            back = subprocess.run([zstd_cli, "-d", "-q", "-c", zpath], stdout=subprocess.PIPE, check=True).stdout
            assert back == data, "zstd CLI round trip"
            del back
            devnull = subprocess.DEVNULL
            tc, _ = best_of(args.repeat, lambda: subprocess.run([zstd_cli, "-3", "-T1", "-q", "-c", path], stdout=devnull, check=True))
            td, _ = best_of(args.repeat, lambda: subprocess.run([zstd_cli, "-d", "-q", "-c", zpath], stdout=devnull, check=True))
            os.remove(zpath)
            version = subprocess.run([zstd_cli, "-V"], stdout=subprocess.PIPE, text=True, check=True).stdout
            m = re.search(r"v(\d+\.\d+\.\d+)", version)
            emit(kind="lossless", input=file, label=label, codec=f"zstd -3 CLI {m.group(1) if m else ''} (-T1, file to /dev/null)".replace("  ", " "), bytes=n, compressed=cli_size, compress_mbps=n / 1e6 / tc, decompress_mbps=n / 1e6 / td)
        del comp
        if ZipNN is None:
            continue
        # ZipNN, one thread. Its compress() rewrites its input buffer: each run gets a fresh copy
        # (made before the clock starts). Codes are bytes, not floats: ZipNN has no integer byte
        # mode, so they go through its FP8 path (one byte group, Huffman), the closest it has.
        zdtype = "float8_e4m3fn" if dtype == "uint8" else dtype
        try:
            z = ZipNN(input_format="byte", bytearray_dtype=zdtype, threads=1)
            best_c, comp = float("inf"), None
            for _ in range(args.repeat):
                buf = bytearray(data)
                t = time.perf_counter()
                comp = z.compress(buf)
                best_c = min(best_c, time.perf_counter() - t)
                del buf
            td, back = best_of(args.repeat, lambda: z.decompress(comp))
        except Exception as e:  # e.g. a code path that needs real torch (the stub raises)
            skipped(f"ZipNN on {file}", f"{type(e).__name__}: {e}")
            continue
        ok = bytes(back) == data
        codec = f"ZipNN {zipnn_version} (threads=1, " + ("fp8 byte mode" if dtype == "uint8" else dtype) + ")"
        if not ok:
            log(f"WARNING: ZipNN round trip differs on {file}")
            codec += " ROUND TRIP FAILED"
        emit(kind="lossless", input=file, label=label, codec=codec, bytes=n, compressed=len(comp), compress_mbps=n / 1e6 / best_c, decompress_mbps=n / 1e6 / td, roundtrip_ok=ok, note=f"ZipNN ran with {zipnn_note}")
        del comp, back


def fmt(x, digits=1):
    return "n/a" if x is None else f"{x:,.{digits}f}"


def rel(ours, theirs, digits=2):
    if not ours or not theirs:
        return "n/a"
    return f"{ours / theirs:.{digits}f}x"


def gguf_error(args):
    """Relative Frobenius error, over all tensors, of a quantized GGUF against the BF16 one."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ref = {t.name: t for t in GGUFReader(args.reference).tensors}
    err = norm = 0.0
    for t in GGUFReader(args.quantized).tensors:
        w = dequantize(ref[t.name].data, ref[t.name].tensor_type).astype(np.float64).ravel()
        q = dequantize(t.data, t.tensor_type).astype(np.float64).ravel()
        err += float(np.sum((q - w) ** 2))
        norm += float(np.sum(w * w))
    print(json.dumps({"rel_fro_error": (err / norm) ** 0.5 if norm else 0.0}))


def mix_recipes(args):
    """hqq4-g32.yaml, and hqq4-g32-mix.yaml (6 bits on the tensors llama-quantize's Q4_K_M
    promoted to Q6_K, given by their GGUF names) when there are any."""
    ours = {v: k for k, v in GGUF_NAMES.items()}
    promoted = []
    for name in args.promoted.split():
        m = re.fullmatch(r"blk\.(\d+)\.(.*)", name)
        if not m or m.group(2) not in ours:
            raise SystemExit(f"mix-recipes: unexpected GGUF tensor name {name!r}")
        promoted.append(f"model.layers.{m.group(1)}.{ours[m.group(2)]}")
    weights = "    targets: ['re:.*\\.weight$']\n    ignore: ['re:(?i).*(embed|lm_head|norm).*'"
    hqq = "  - quantize: {{ method: hqq, bits: {}, granularity: group, group_size: 32 }}\n"
    with open(os.path.join(args.work, "hqq4-g32.yaml"), "w") as f:
        f.write("name: hqq4-g32\npasses:\n" + hqq.format(4) + weights + "]\n")
    if promoted:
        exact = ", ".join(f"'re:{re.escape(n)}'" for n in promoted)
        with open(os.path.join(args.work, "hqq4-g32-mix.yaml"), "w") as f:
            f.write("name: hqq4-g32-mix\npasses:\n" + hqq.format(4) + weights + f", {exact}]\n")
            f.write(hqq.format(6) + f"    targets: [{exact}]\n")
    log(f"mix-recipes: {len(promoted)} tensors at 6 bits in hqq4-g32-mix")


def report(args):
    rows = [json.loads(line) for line in open(args.results) if line.strip()]
    meta = next((r for r in rows if r["kind"] == "meta"), {})
    print()
    print(f"## shardpress vs peers ({meta.get('when', '?')}, {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, load average at start {meta.get('load', '?')}, mode {meta.get('mode', '?')})")
    print()
    print("All speeds are MB/s (10^6 bytes) of the original input on ONE thread, best of the repeats; ratio = stored / original bytes.")
    print("'ours vs X' = shardpress's value divided by X's (size: below 1 means we store less; speed: above 1 means we are faster).")
    print()
    print("### Lossless (same bytes for every codec)")
    print()
    print("| input | MB | codec | ratio | compress MB/s | decompress MB/s | ours vs it: size | ours vs it: compress | ours vs it: decompress |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for file, label, _, _ in INPUTS:
        group = [r for r in rows if r["kind"] == "lossless" and r["input"] == file]
        ours = next((r for r in group if r["codec"].startswith("shardpress")), None)
        if ours:
            mb = ours["bytes"] / 1e6
            print(f"| {label} | {mb:,.1f} | memcpy (same process) | 1.000 | {fmt(ours['memcpy_mbps'])} | {fmt(ours['memcpy_mbps'])} | | {rel(ours['compress_mbps'], ours['memcpy_mbps'])} | {rel(ours['decompress_mbps'], ours['memcpy_mbps'])} |")
        for r in sorted(group, key=lambda r: (not r["codec"].startswith("shardpress"), r["codec"])):
            ratio = r["compressed"] / r["bytes"]
            if ours and r is not ours:
                cmp = f"| {rel(ours['compressed'] / ours['bytes'], ratio, 3)} | {rel(ours['compress_mbps'], r['compress_mbps'])} | {rel(ours['decompress_mbps'], r['decompress_mbps'])} |"
            else:
                cmp = "| | | |"
            print(f"| {label} | {r['bytes'] / 1e6:,.1f} | {r['codec']} | {ratio:.4f} | {fmt(r['compress_mbps'])} | {fmt(r['decompress_mbps'])} {cmp}")
    for note in sorted({r["note"] for r in rows if r.get("note")}):
        print(f"\nNote: {note}.")
    e2e = next((r for r in rows if r["kind"] == "e2e"), None)
    if e2e:
        print()
        print(f"End to end through the CLI on the generated model ({e2e['bytes'] / 1e6:,.1f} MB safetensors): `shardpress run --workers 1 --threads 1 --recipe lossless --format spz` "
              f"{fmt(e2e['compress_mbps'])} MB/s ({e2e['compress_s']:.2f} s, archive ratio {e2e['ratio']:.4f}); `shardpress decompress` {fmt(e2e['decompress_mbps'])} MB/s ({e2e['decompress_s']:.2f} s), restored files byte-identical: {e2e['identical']}. "
              f"Both include process start, file reads and writes.")
    pipes = [r for r in rows if r["kind"] == "pipeline"]
    if pipes:
        print()
        print("### The distributed pipeline (2 local worker processes, 1 thread each, gRPC over loopback, local object store)")
        print()
        print("Seconds summed over tasks, from report.json. Read, compute and write are measured by the worker inside a task; "
              "'round trips' = the time from the coordinator's lease to its acceptance of the result, less the worker's own task time "
              "(lease and result RPCs, task start-up); 'idle' = 2 x wall - the lease-to-result spans (before a worker's first lease and after "
              "its last result: start-up and the uneven tail). Compute share = compute / (2 x wall).")
        print()
        print("| recipe | format | MB | wall s | MB/s | tasks | read s | compute s | write s | round trips s | idle s | compute share |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in pipes:
            slots = 2 * r["wall_s"]
            print(f"| {r['recipe']} | {r['format']} | {r['bytes'] / 1e6:,.1f} | {r['wall_s']:.2f} | {fmt(r['bytes'] / 1e6 / r['wall_s'])} | {r['tasks']} | "
                  f"{r['read_s']:.2f} | {r['compute_s']:.2f} | {r['write_s']:.2f} | {max(r['span_s'] - r['task_s'], 0):.2f} | "
                  f"{max(slots - r['span_s'], 0):.2f} | {r['compute_s'] / slots:.0%} |")
    quant = [r for r in rows if r["kind"] in ("llama", "ours_pass")]
    if quant:
        print()
        subset = next((r["bytes"] for r in quant if r["kind"] == "ours_pass"), None)
        print(f"### Quantizers (same BF16 projection matrices{f', {subset / 1e6:,.1f} MB' if subset else ''}; one thread)")
        print()
        print("| quantizer | MB/s of BF16 input | output / BF16 input | rel. Frobenius error | vs llama-quantize Q4_0 speed | vs its llama.cpp counterpart: speed | error |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        llama = {r["type"]: r for r in quant if r["kind"] == "llama"}
        q4_0 = llama.get("Q4_0", {}).get("mbps")
        for t, r in llama.items():
            err = r.get("rel_fro_error")
            print(f"| llama-quantize {t} (1 thread; its own 'quantize time', incl. reading and writing the GGUF) | {fmt(r['mbps'])} | {r['ratio']:.4f} | {'' if err is None else f'{err:.4f}'} | {rel(r['mbps'], q4_0)} | | |")
        counterpart = {"int8": "Q8_0", "int4-g128": "Q4_0", "hqq4": "Q4_K_M", "hqq4-g32": "Q4_K (--pure)", "hqq4-g32-mix": "Q4_K_M"}
        for r in (r for r in quant if r["kind"] == "ours_pass"):
            name = counterpart.get(r["preset"], "")
            peer = llama.get(name, {}).get("mbps")
            peer_err = llama.get(name, {}).get("rel_fro_error")
            err = r.get("rel_fro_error")
            err_cmp = f"{rel(err, peer_err, 3)} {name}" if err is not None and peer_err else ""
            err_txt = "" if err is None else f"{err:.4f}"
            print(f"| shardpress {r['preset']}: encode_chunk (pass + reconstruction), in memory | {fmt(r['encode_mbps'])} | | {err_txt} | {rel(r['encode_mbps'], q4_0)} | {rel(r['encode_mbps'], peer)} {name} | {err_cmp} |")
            if "encode_metrics_mbps" in r:
                print(f"| shardpress {r['preset']}: encode_chunk_measured (pass + reconstruction + error metrics, as a worker runs it) | {fmt(r['encode_metrics_mbps'])} | | {err_txt} | {rel(r['encode_metrics_mbps'], q4_0)} | {rel(r['encode_metrics_mbps'], peer)} {name} | {err_cmp} |")
            print(f"| shardpress {r['preset']}: encode_chunk + frame (entropy-coded .spz record) | {fmt(r['encode_frame_mbps'])} | {r['ratio']:.4f} | {err_txt} | {rel(r['encode_frame_mbps'], q4_0)} | {rel(r['encode_frame_mbps'], peer)} {name} | {err_cmp} |")
    skipped = [r for r in rows if r["kind"] == "skipped"]
    for r in skipped:
        print(f"\nSKIPPED: {r['what']}: {r['why']}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--model", required=True)
    a.add_argument("--minilm", required=True)
    a.add_argument("--work", required=True)
    a.add_argument("--subset-mb", type=float, default=400)
    a = sub.add_parser("gguf-error")
    a.add_argument("--quantized", required=True)
    a.add_argument("--reference", required=True)
    a = sub.add_parser("measure")
    a.add_argument("--work", required=True)
    a.add_argument("--results", required=True)
    a.add_argument("--repeat", type=int, default=3)
    a = sub.add_parser("mix-recipes")
    a.add_argument("--work", required=True)
    a.add_argument("--promoted", default="", help="GGUF names of the tensors Q4_K_M made Q6_K")
    a = sub.add_parser("report")
    a.add_argument("--results", required=True)
    args = p.parse_args()
    {"prepare": prepare, "gguf-error": gguf_error, "measure": measure, "mix-recipes": mix_recipes, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
