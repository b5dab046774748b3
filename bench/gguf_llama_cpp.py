"""llama.cpp's own GGUF pipeline, for bench/gguf-vs-llama-cpp.sh (run with the real-readers venv:
torch, transformers, gguf, llama-cpp-python; see ../shared/tools/real-readers-venv).

  python gguf_llama_cpp.py fetch VERSION DIR
      downloads and unpacks the llama-cpp-python VERSION sdist from PyPI into DIR and prints the
      path of the llama.cpp tree it vendors (convert_hf_to_gguf.py and its gguf-py).
  python gguf_llama_cpp.py convert VENDOR MODEL_DIR OUTTYPE OUTFILE PRE
      runs llama.cpp's convert_hf_to_gguf.py from VENDOR (the llama.cpp tree vendored in the
      llama-cpp-python sdist). A generated tokenizer's pre-tokenizer hash is unknown to the
      converter, so get_vocab_base_pre returns PRE (e.g. llama-bpe); without sentencepiece,
      _create_vocab_sentencepiece raises what it raises when tokenizer.model is absent.
  python gguf_llama_cpp.py quantize IN OUT FTYPE
      llama-quantize through libllama (llama_model_quantize), FTYPE a llama_ftype number.
  python gguf_llama_cpp.py compare OURS REFERENCE
      tensor by tensor: names, types, shapes and bytes; exit 1 on any difference.
"""
import sys


def fetch(version, directory):
    import hashlib
    import io
    import re
    import tarfile
    import urllib.request
    page = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
    sdist = f"llama_cpp_python-{version}.tar.gz"
    url = next(u for u in re.findall(r'href="([^"]+)"', page) if f"/{sdist}#" in u)
    url, sha256 = url.split("#sha256=")
    data = urllib.request.urlopen(url).read()
    assert hashlib.sha256(data).hexdigest() == sha256, f"{sdist}: sha256 mismatch"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(directory, filter="data")
    print(f"{directory}/llama_cpp_python-{version}/vendor/llama.cpp")


def convert(vendor, model, outtype, outfile, pre):
    import runpy
    sys.path.insert(0, vendor + "/gguf-py")
    sys.path.insert(0, vendor)
    import conversion.base as base
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre

    def no_spm(self):
        raise FileNotFoundError("tokenizer.model")
    base.TextModel._create_vocab_sentencepiece = no_spm
    sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", outtype, "--outfile", outfile]
    runpy.run_path(vendor + "/convert_hf_to_gguf.py", run_name="__main__")


def quantize(inp, out, ftype):
    import ctypes
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize returned {rc}"


def compare(ours, ref):
    from gguf import GGUFReader
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(ref).tensors}
    problems = [] if a.keys() == b.keys() else [f"names differ: {sorted(a.keys() ^ b.keys())}"]
    same = 0
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name], b[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            problems.append(f"{name}: {x.tensor_type.name} {list(x.shape)} vs {y.tensor_type.name} {list(y.shape)}")
        elif x.data.tobytes() != y.data.tobytes():
            problems.append(f"{name}: {x.tensor_type.name} bytes differ")
        else:
            same += 1
    # The model's own keys (`{arch}.*`) must be the converter's, value for value.
    ra, rb = GGUFReader(ours), GGUFReader(ref)
    arch = rb.fields["general.architecture"].contents()
    for key, field in rb.fields.items():
        if key.startswith(arch + "."):
            mine = ra.fields.get(key)
            if mine is None or mine.contents() != field.contents():
                problems.append(f"{key}: {mine.contents() if mine else 'missing'} vs {field.contents()}")
    extra = [k for k in ra.fields if k.startswith(arch + ".") and k not in rb.fields]
    problems += [f"{k}: not written by llama.cpp" for k in extra]
    print(f"{same}/{len(b)} tensors byte-identical" + "".join(f"\n  {p}" for p in problems[:10]))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    commands = {"fetch": fetch, "convert": convert, "quantize": quantize, "compare": compare}
    commands[sys.argv[1]](*sys.argv[2:])
