"""What the Python tests share: running the `shardpress` binary under test, and safetensors files
read by hand with numpy (the format is simple enough that the tests need no reader of ours)."""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np

BIN = os.environ.get("SHARDPRESS_BIN", "target/debug/shardpress")

DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "I32": np.int32,
          "I64": np.int64, "F8_E4M3": np.uint8}


def shardpress(*args, check=True):
    result = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, f"shardpress {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def read_safetensors(path: Path):
    """name -> (dtype, numpy array of the raw element type)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = np.frombuffer(data[8 + n + begin:8 + n + end], dtype=DTYPES[info["dtype"]])
        out[name] = (info["dtype"], raw.reshape(info["shape"]))
    return out


def read_dir(directory: Path):
    """Every tensor of a folder's safetensors files."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(read_safetensors(path))
    return tensors


def to_f32(dtype, raw):
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def from_f32(dtype, values):
    """f32 -> the tensor's dtype, round to nearest even (as the writer rounds)."""
    if dtype == "BF16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return values.astype(DTYPES[dtype])


def field_value(field):
    """A gguf-py metadata field as Python data (strings decoded, arrays as lists)."""
    from gguf import GGUFValueType as V

    types = list(field.types)
    if types[0] == V.ARRAY:
        if types[-1] == V.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    part = field.parts[field.data[0]]
    if types[0] == V.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]
