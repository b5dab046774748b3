"""A model read over plain HTTP (a server answering Range requests, as object stores' public
URLs and model mirrors do, started here on loopback): headers and tensors are range-read, the
companion files are found without a directory listing, and the output is byte-identical to a
run on the local copy."""

import http.server
import os
import re
import subprocess
import threading
from functools import partial
from pathlib import Path

BIN = os.environ.get("SHARDPRESS_BIN", "target/debug/shardpress")


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Python's file server, plus single byte ranges (it answers no listing but HTML)."""

    def send_head(self):
        wanted = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not wanted or not os.path.isfile(path):
            self.remaining = None
            return super().send_head()
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
        size = os.path.getsize(path)
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
        source = open(path, "rb")
        source.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.remaining = end - start + 1
        return source

    def copyfile(self, source, outputfile):
        if self.remaining is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(self.remaining))

    def log_message(self, *args):
        pass


def shardpress(*args):
    result = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, f"shardpress {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_a_model_read_over_http_compresses_as_the_local_copy(tmp_path: Path):
    served = tmp_path / "served"
    model = served / "model"
    shardpress("gen-model", "--out", model, "--size", "6MB", "--max-shard-mb", "2")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             partial(RangeHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/model"
        shardpress("run", "--workers", "2", "--model", url, "--out", tmp_path / "from-http",
                   "--recipe", "int8", "--task-budget-mb", "1")
    finally:
        server.shutdown()
    shardpress("run", "--workers", "1", "--model", model, "--out", tmp_path / "local",
               "--recipe", "int8", "--task-budget-mb", "1")
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "from-http").iterdir())
    assert "tokenizer.json" in names and "config.json" in names
    for name in names:
        if name in ("report.json", "report.html", "manifest.json"):
            continue
        assert (tmp_path / "from-http" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
