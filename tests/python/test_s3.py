"""The same job through an S3-compatible server (moto, started here on loopback): shardpress
reads the model from s3:// by range, writes shards, index, report and manifest to s3://, and
the shards are byte-identical to a run on the local filesystem."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

BIN = os.environ.get("SHARDPRESS_BIN", "target/debug/shardpress")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_server():
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"  # installed in the test venv
    server = subprocess.Popen([str(moto), "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true"}
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="models")
            break
        except Exception:
            time.sleep(0.1)
    else:
        server.kill()
        pytest.fail("moto_server did not start")
    yield client, env
    server.kill()
    server.wait()


def shardpress(*args, env=None):
    result = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"shardpress {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def upload(client, folder: Path, prefix: str):
    for path in folder.iterdir():
        client.upload_file(str(path), "models", f"{prefix}/{path.name}")


def test_a_job_reads_and_writes_s3_and_matches_a_local_run(s3_server, tmp_path: Path):
    client, env = s3_server
    model = tmp_path / "model"
    shardpress("gen-model", "--out", model, "--size", "6MB", "--max-shard-mb", "2")
    upload(client, model, "llama")
    shardpress("run", "--workers", "2", "--model", "s3://models/llama", "--out", "s3://models/llama-int8",
               "--recipe", "int8", "--task-budget-mb", "1", env=env)
    shardpress("verify", "s3://models/llama-int8", env=env)
    shardpress("run", "--workers", "1", "--model", model, "--out", tmp_path / "local",
               "--recipe", "int8", "--task-budget-mb", "1")
    manifest = json.loads(client.get_object(Bucket="models", Key="llama-int8/manifest.json")["Body"].read())
    shards = [o["name"] for o in manifest["objects"] if o["name"].endswith(".safetensors")]
    assert len(shards) > 2
    for name in shards + ["model.safetensors.index.json", "config.json"]:
        remote = client.get_object(Bucket="models", Key=f"llama-int8/{name}")["Body"].read()
        assert remote == (tmp_path / "local" / name).read_bytes(), name


def test_a_gguf_file_is_assembled_on_s3_in_parts_from_several_workers(s3_server, tmp_path: Path):
    """Above one slice (at least 8 MiB on S3), two workers upload parts of one multipart upload
    that the coordinator completes; the file equals one assembled whole on local disk (from a
    folder of the same name: GGUF metadata carries the model's name)."""
    client, env = s3_server
    model = tmp_path / "model"
    shardpress("gen-model", "--out", model, "--size", "24MB", "--max-shard-mb", "8")
    upload(client, model, "model")
    shardpress("run", "--workers", "2", "--model", "s3://models/model", "--out", "s3://models/big-gguf",
               "--recipe", "q8_0", "--format", "gguf", "--assembly-slice-mib", "8", env=env)
    shardpress("verify", "s3://models/big-gguf", env=env)
    shardpress("run", "--workers", "1", "--model", model, "--out", tmp_path / "local",
               "--recipe", "q8_0", "--format", "gguf")
    local = (tmp_path / "local" / "model.gguf").read_bytes()
    assert len(local) > 8 << 20  # several slices
    remote = client.get_object(Bucket="models", Key="big-gguf/model.gguf")["Body"].read()
    assert remote == local
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="models", Prefix="big-gguf/")["Contents"]]
    assert sorted(keys) == ["big-gguf/manifest.json", "big-gguf/model.gguf", "big-gguf/report.html",
                           "big-gguf/report.json"]
    assert client.list_multipart_uploads(Bucket="models").get("Uploads", []) == []


def test_a_missing_s3_object_is_a_clear_error(s3_server):
    _, env = s3_server
    result = subprocess.run([BIN, "run", "--workers", "1", "--model", "s3://models/nothing-here",
                             "--out", "s3://models/out"], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "s3://models/nothing-here" in result.stderr


def test_decompress_restores_into_s3(s3_server, tmp_path: Path):
    """`decompress --out s3://…` uploads each restored file (once complete) and the companion
    files: the same bytes as a restore into a local folder, which for a lossless archive are
    the model's own."""
    client, env = s3_server
    model = tmp_path / "model"
    shardpress("gen-model", "--out", model, "--size", "20MB", "--max-shard-mb", "12")
    shardpress("run", "--workers", "1", "--model", model, "--out", tmp_path / "spz",
               "--recipe", "lossless", "--format", "spz")
    shardpress("decompress", tmp_path / "spz", "--out", "s3://models/restored", env=env)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="models", Prefix="restored/")["Contents"])
    names = sorted(p.name for p in model.iterdir())
    assert keys == [f"restored/{name}" for name in names]
    for name in names:
        remote = client.get_object(Bucket="models", Key=f"restored/{name}")["Body"].read()
        if name == "model.safetensors.index.json":
            continue  # regenerated (same map, its own formatting)
        assert remote == (model / name).read_bytes(), name
    assert client.list_multipart_uploads(Bucket="models").get("Uploads", []) == []


def test_credentials_come_from_a_profile_file_and_their_absence_is_said_plainly(s3_server, tmp_path: Path):
    client, env = s3_server
    model = tmp_path / "model"
    shardpress("gen-model", "--out", model, "--size", "6MB", "--max-shard-mb", "2")
    upload(client, model, "llama")
    bare = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\naws_access_key_id = wrong\n\n"
                           "[ci]\naws_access_key_id = test\naws_secret_access_key = test\n")
    # Keys from the named profile only (with none at all, the metadata service would be asked).
    with_profile = {**bare, "AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_PROFILE": "ci",
                    "HOME": str(tmp_path), "AWS_METADATA_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    listed = shardpress("inspect", "s3://models/llama", env=with_profile)
    assert "layer 0" in listed.stdout
    # A profile that does not exist is named.
    missing = subprocess.run([BIN, "inspect", "s3://models/llama"], capture_output=True, text=True,
                             env={**with_profile, "AWS_PROFILE": "nope"})
    assert missing.returncode != 0 and "AWS_PROFILE=nope: no such profile" in missing.stderr
    # No keys anywhere, and no metadata service: said once, plainly, without retrying a task.
    nothing = {**bare, "HOME": str(tmp_path / "empty"),
               "AWS_METADATA_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    refused = subprocess.run([BIN, "inspect", "s3://models/llama"], capture_output=True, text=True,
                             env=nothing)
    assert refused.returncode != 0
    assert "no credentials found" in refused.stderr and "AWS_PROFILE" in refused.stderr, refused.stderr


def start_coordinator(listen: str, log: Path, env):
    coordinator = subprocess.Popen([BIN, "coordinator", "--listen", listen, "--lease-ttl-secs", "1"],
                                   stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                                   env={**env, "SHARDPRESS_LOG": "info"})
    banner = coordinator.stdout.readline()
    assert ":" in banner, banner
    return coordinator, "http://" + banner.strip().rsplit(" ", 1)[-1]


def start_worker(url: str, name: str, log: Path, env, *extra):
    return subprocess.Popen([BIN, "worker", "--coordinator", url, "--name", name, "--threads", "1",
                             "--chunk-mb", "0.25", *extra], stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), env={**env, "SHARDPRESS_LOG": "info"})


def wait_for(path: Path, *needles, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        text = path.read_text() if path.exists() else ""
        if any(n in text for n in needles):
            return text
        time.sleep(0.05)
    pytest.fail(f"{path.name} never logged any of {needles}:\n{text}")


def test_a_stale_worker_cannot_replace_an_object_on_s3_and_its_upload_is_aborted(s3_server, tmp_path: Path):
    """A worker paused after its last lease check (a frozen process) wakes up after its
    coordinator was killed and another job finished into the same output: its upload was
    begun by the coordinator and aborted when the new job took the output over, so it can
    neither replace the new job's object nor leave an open multipart upload behind."""
    client, env = s3_server
    model = tmp_path / "model"
    shardpress("gen-model", "--out", model, "--size", "6MB", "--max-shard-mb", "2")
    upload(client, model, "llama")
    coordinator, url = start_coordinator("127.0.0.1:0", tmp_path / "coordinator.log", env)
    workers = [start_worker(url, "paused", tmp_path / "paused.log", env,
                            "--debug-stall-before-finish-ms", "10000")]
    try:
        first = subprocess.Popen([BIN, "compress", "--coordinator", url, "--model", "s3://models/llama",
                                  "--out", "s3://models/out", "--recipe", "int8", "--task-budget-mb", "1",
                                  "--reconnect-secs", "0"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        log = wait_for(tmp_path / "paused.log", "task acquired")
        stale = log.split(" output=")[1].split()[0]
        # The attempt's upload exists, begun by the coordinator (and journaled).
        assert client.list_multipart_uploads(Bucket="models").get("Uploads", []) != []
        coordinator.kill()
        coordinator.wait()
        first.wait()
        coordinator, url = start_coordinator(url.removeprefix("http://"), tmp_path / "coordinator-2.log", env)
        workers.append(start_worker(url, "b", tmp_path / "b.log", env))
        shardpress("compress", "--coordinator", url, "--model", "s3://models/llama", "--out", "s3://models/out",
                   "--recipe", "int4-g128", "--task-budget-mb", "1", "--overwrite", env=env)
        manifest = json.loads(client.get_object(Bucket="models", Key="out/manifest.json")["Body"].read())
        assert stale in [o["name"] for o in manifest["objects"]]
        wait_for(tmp_path / "paused.log", "task failed", "result not accepted")
        time.sleep(0.5)
        shardpress("verify", "s3://models/out", env=env)
        assert client.list_multipart_uploads(Bucket="models").get("Uploads", []) == []
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="models", Prefix="out/.shardpress")
                .get("Contents", [])]
        assert keys == []
    finally:
        for process in workers + [coordinator]:
            process.kill()
            process.wait()
