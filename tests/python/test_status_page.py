"""The coordinator's status page and a job's report.html in a real headless browser (Debian's
Chromium): the page's script fetches /api/status and renders the job, nothing a job carries is
parsed as HTML, and both pages render to a screenshot that is not blank.

Chromium is required, not optional: scripts/test.sh installs it, and these tests fail without it.
"""

import json
import os
import shutil
import struct
import subprocess
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest

from shardpress_helpers import BIN, shardpress

# A worker whose name is HTML: the pages must show it as text, never build an element of it.
HOSTILE = 'page-worker<img src=x onerror="document.title=1">'


def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is not installed (apt-get install chromium); scripts/test.sh installs it"
    return found


def browse(*args, timeout=90):
    """Runs headless Chromium with a fresh profile; returns its stdout."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking", "--disable-component-update",
                   "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"chromium {args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def png_pixels(path: Path):
    """The RGB(A) pixels of an 8-bit PNG, decoded by hand (zlib and the five row filters)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * bpp)
    rows = np.zeros((height, width * bpp), dtype=np.uint8)
    previous = np.zeros(width * bpp, dtype=np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 0:
            out = line
        elif kind == 1:
            out = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:
            out = (line + previous) % 256
        else:
            out, up = [0] * len(line), previous.tolist()
            line = line.tolist()
            for i in range(len(line)):
                left = out[i - bpp] if i >= bpp else 0
                upper_left = up[i - bpp] if i >= bpp else 0
                if kind == 3:
                    guess = (left + up[i]) // 2
                else:
                    p = left + up[i] - upper_left
                    pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - upper_left)
                    guess = left if pa <= pb and pa <= pc else up[i] if pb <= pc else upper_left
                out[i] = (line[i] + guess) % 256
            out = np.array(out, dtype=np.int32)
        rows[y] = out
        previous = out
    return rows.reshape(height, width, bpp)[:, :, :3]


def assert_rendered(png: Path, what: str):
    assert png.is_file(), f"no screenshot of {what}"
    assert png.stat().st_size > 5000, f"the screenshot of {what} is only {png.stat().st_size} bytes"
    pixels = png_pixels(png)
    assert pixels.shape[:2] == (900, 1200), pixels.shape
    colors, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert len(colors) > 16, f"the screenshot of {what} has only {len(colors)} colours"
    assert counts.max() < 0.97 * counts.sum(), f"the screenshot of {what} is nearly blank"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A coordinator with --http-listen and a worker, after one finished job."""
    root = tmp_path_factory.mktemp("status")
    model, out = root / "model", root / "out"
    shardpress("gen-model", "--out", model, "--size", "3MB", "--max-shard-mb", "5000")
    env = dict(os.environ, SHARDPRESS_LOG="info")
    coordinator = subprocess.Popen(
        [BIN, "coordinator", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=open(root / "coordinator.log", "w"), text=True, env=env)
    worker = None
    try:
        grpc = coordinator.stdout.readline().split()[-1]
        http = coordinator.stdout.readline().split()[-1]
        worker = subprocess.Popen(
            [BIN, "worker", "--coordinator", f"http://{grpc}", "--name", HOSTILE],
            stdout=subprocess.DEVNULL, stderr=open(root / "worker.log", "w"), env=env)
        shardpress("compress", "--coordinator", f"http://{grpc}", "--model", model, "--out", out,
                   "--recipe", "int4-g128", "--task-budget-mb", "1")
        with urllib.request.urlopen(f"http://{http}/api/status", timeout=10) as response:
            status = json.load(response)
        yield http, status["jobs"][0]["id"], out, root
    finally:
        for process in (worker, coordinator):
            if process is not None:
                process.kill()
                process.wait()


def test_the_status_page_script_renders_the_finished_job(cluster):
    http, job_id, _, _ = cluster
    dom = browse("--virtual-time-budget=3000", "--dump-dom", f"http://{http}/")
    assert f'data-job="{job_id}"' in dom, dom
    assert "succeeded" in dom, dom
    # The finished job's per-layer error table came from its report.
    assert "per-layer errors" in dom and "layer 0" in dom, dom
    # The hostile worker name is on the page as text, and no element was made of it.
    assert "page-worker&lt;img src=x" in dom, dom
    assert "<img" not in dom, dom
    assert '<div id="updated" class="">shardpress ' in dom, "the page never heard back"


def test_the_status_page_renders_to_a_screenshot(cluster):
    http, _, _, root = cluster
    png = root / "status.png"
    browse("--virtual-time-budget=3000", f"--screenshot={png}", "--window-size=1200,900",
           f"http://{http}/")
    assert_rendered(png, "the status page")


def test_report_html_renders_offline_with_its_charts(cluster):
    _, job_id, out, root = cluster
    report = out / "report.html"
    dom = browse("--dump-dom", report.as_uri())
    assert job_id in dom and dom.count("<svg") >= 5, dom[:2000]
    # The worker's name (in the time table) is text there too.
    assert "page-worker&lt;img src=x" in dom, dom
    assert "<script" not in dom and "<img" not in dom
    png = root / "report.png"
    browse(f"--screenshot={png}", "--window-size=1200,900", report.as_uri())
    assert_rendered(png, "report.html")
