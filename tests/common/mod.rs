//! Test harness for whole-system tests: a `TestCluster` of real `shardpress` processes (a
//! coordinator on a free loopback port and worker processes), each with its own log file,
//! killed on drop; plus model generation and an independent reference dequantizer.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use half::{bf16, f16};

pub const BIN: &str = env!("CARGO_BIN_EXE_shardpress");

pub fn shardpress(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("SHARDPRESS_LOG", "info")
        .output()
        .expect("run shardpress")
}

/// An output's `report.json`.
pub fn report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json")).unwrap()
}

/// `shardpress run` of `recipe` on `model` into `out` with `workers` worker processes of one
/// thread each, and `extra` flags.
pub fn run_job(model: &Path, out: &Path, recipe: &str, workers: usize, extra: &[&str]) -> Output {
    let workers = workers.to_string();
    let mut args = vec![
        "run",
        "--workers",
        &workers,
        "--threads",
        "1",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--recipe",
        recipe,
    ];
    args.extend(extra);
    shardpress(&args)
}

/// A process's stderr as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Generates a small model; `max_shard_mb` below its size gives a sharded model with an index.
pub fn gen_model(dir: &Path, size: &str, dtype: &str, max_shard_mb: u64) {
    let out = shardpress(&[
        "gen-model",
        "--out",
        dir.to_str().unwrap(),
        "--size",
        size,
        "--dtype",
        dtype,
        "--max-shard-mb",
        &max_shard_mb.to_string(),
    ]);
    assert_success(&out, "gen-model");
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub url: String,
    /// The address of the coordinator's HTTP port, when started with `--http-listen`.
    pub http: Option<String>,
    coordinator: Child,
    /// Coordinators started so far (each logs to `coordinator.log`, `coordinator-2.log`, …).
    coordinators: usize,
    workers: Vec<(String, Child)>,
}

/// Starts a coordinator listening on `listen`, logging to `log`; returns it, its address and,
/// with `--http-listen`, its HTTP address (both read from its stdout).
fn spawn_coordinator(
    listen: &str,
    log: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Child, String, Option<String>) {
    let log = std::fs::File::create(log).unwrap();
    let mut coordinator = Command::new(BIN)
        .args(["coordinator", "--listen", listen])
        .args(extra)
        .envs(env.iter().copied())
        .env("SHARDPRESS_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start coordinator");
    let mut stdout = BufReader::new(coordinator.stdout.take().unwrap());
    let mut read_addr = || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line.trim().rsplit(' ').next().unwrap().to_string();
        assert!(addr.contains(':'), "unexpected coordinator banner {line:?}");
        addr
    };
    let addr = read_addr();
    // Read before the pipe closes: a coordinator whose stdout is gone exits.
    let http = extra.contains(&"--http-listen").then(read_addr);
    (coordinator, addr, http)
}

impl TestCluster {
    pub fn start(lease_ttl_secs: f64) -> Self {
        Self::start_with(&["--lease-ttl-secs", &lease_ttl_secs.to_string()])
    }

    /// A cluster whose coordinator gets these arguments.
    pub fn start_with(args: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", args, &[])
    }

    /// A cluster whose coordinator listens on `listen` with these arguments and environment.
    pub fn start_on(listen: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("coordinator.log");
        let (coordinator, addr, http) = spawn_coordinator(listen, &log, args, env);
        Self {
            dir,
            url: format!("http://{addr}"),
            http,
            coordinator,
            coordinators: 1,
            workers: Vec::new(),
        }
    }

    /// SIGKILLs the coordinator (its workers run on).
    pub fn kill_coordinator(&mut self) {
        self.coordinator.kill().unwrap();
        self.coordinator.wait().unwrap();
    }

    /// Starts a new coordinator on the same address with these arguments; returns the name
    /// of its log (see [`TestCluster::log_path`]).
    pub fn restart_coordinator(&mut self, args: &[&str]) -> String {
        self.coordinators += 1;
        let name = format!("coordinator-{}", self.coordinators);
        let listen = self.url.trim_start_matches("http://").to_string();
        let (coordinator, _, http) = spawn_coordinator(&listen, &self.log_path(&name), args, &[]);
        self.http = http;
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
        self.coordinator = coordinator;
        name
    }

    /// Whether worker `name` is still running.
    pub fn worker_alive(&mut self, name: &str) -> bool {
        let (_, child) = self
            .workers
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("worker");
        child.try_wait().unwrap().is_none()
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    pub fn add_worker(&mut self, name: &str, extra: &[&str]) {
        self.add_worker_with_env(name, extra, &[]);
    }

    /// A worker with these arguments and environment variables.
    pub fn add_worker_with_env(&mut self, name: &str, extra: &[&str], env: &[(&str, &str)]) {
        let log = std::fs::File::create(self.log_path(name)).unwrap();
        let child = Command::new(BIN)
            .args([
                "worker",
                "--coordinator",
                &self.url,
                "--name",
                name,
                "--threads",
                "1",
            ])
            .args(extra)
            .envs(env.iter().copied())
            .env("SHARDPRESS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start worker");
        self.workers.push((name.to_string(), child));
    }

    /// Sends SIGTERM to worker `name` and waits for it to exit; returns how long that took
    /// and whether it exited successfully.
    pub fn terminate_worker(&mut self, name: &str) -> (std::time::Duration, bool) {
        let (_, child) = self
            .workers
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("worker");
        let started = Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = child.wait().unwrap();
        (started.elapsed(), status.success())
    }

    /// The process id of worker `name`.
    pub fn worker_pid(&self, name: &str) -> u32 {
        let (_, child) = self
            .workers
            .iter()
            .find(|(n, _)| n == name)
            .expect("worker");
        child.id()
    }

    pub fn kill_worker(&mut self, name: &str) {
        let (_, child) = self
            .workers
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("worker");
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
    }

    pub fn compress_command(&self, model: &Path, out: &Path, recipe: &str) -> Command {
        let mut command = Command::new(BIN);
        command
            .args([
                "compress",
                "--coordinator",
                &self.url,
                "--model",
                model.to_str().unwrap(),
            ])
            .args([
                "--out",
                out.to_str().unwrap(),
                "--recipe",
                recipe,
                "--task-budget-mb",
                "1",
            ]);
        command
    }

    pub fn compress(&self, model: &Path, out: &Path, recipe: &str) -> Output {
        self.compress_command(model, out, recipe).output().unwrap()
    }

    /// Waits until `name`'s log contains `needle`.
    pub fn wait_for_log(&self, name: &str, needle: &str, timeout: Duration) {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if std::fs::read_to_string(self.log_path(name))
                .unwrap_or_default()
                .contains(needle)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        panic!("{name} never logged {needle:?}; its log:\n{log}");
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.workers {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
    }
}

/// Every file under `dir`, as paths relative to it (hidden ones and `#` files included).
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                folders.push(path);
            } else if let Ok(relative) = path.strip_prefix(dir) {
                found.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}

/// The objects a finished output consists of: everything the manifest lists, plus the manifest.
pub fn manifest_objects(out: &Path) -> BTreeMap<String, Vec<u8>> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).expect("manifest.json"))
            .unwrap();
    manifest["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let name = o["name"].as_str().unwrap().to_string();
            let bytes = std::fs::read(out.join(&name)).unwrap();
            assert_eq!(
                blake3::hash(&bytes).to_hex().as_str(),
                o["blake3"].as_str().unwrap(),
                "{name}"
            );
            (name, bytes)
        })
        .collect()
}

/// Every tensor of a model directory (by the index when sharded): name -> (dtype, shape, bytes).
pub fn load_tensors(dir: &Path) -> BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in file.tensors() {
            out.insert(
                name,
                (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            );
        }
    }
    out
}

pub fn decode(dtype: safetensors::Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        safetensors::Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        safetensors::Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        safetensors::Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

pub fn encode_like(dtype: safetensors::Dtype, value: f32) -> f32 {
    match dtype {
        safetensors::Dtype::BF16 => bf16::from_f32(value).to_f32(),
        safetensors::Dtype::F16 => f16::from_f32(value).to_f32(),
        _ => value,
    }
}

/// A scale stored as f16, rounded up so that no value clips.
fn f16_scale_up(scale: f32) -> f32 {
    let mut s = f16::from_f32(scale);
    if s.to_f32() < scale {
        s = f16::from_bits(s.to_bits() + 1);
    }
    s.to_f32()
}

/// Independent reference: round-to-nearest fake quantization of one group.
pub fn reference_rtn(
    dtype: safetensors::Dtype,
    group: &[f32],
    bits: u32,
    symmetric: bool,
) -> Vec<f32> {
    // Scales are rounded up onto a grid exact in the tensor's dtype (compressed-tensors
    // stores them there): bf16 for BF16 tensors, f16 otherwise.
    let scale_up = |raw: f32| match dtype {
        safetensors::Dtype::BF16 => f32::from_bits((raw.to_bits() + 0xFFFF) & !0xFFFF),
        _ => f16_scale_up(raw),
    };
    if symmetric {
        let qmax = ((1i32 << (bits - 1)) - 1) as f32;
        let absmax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
        if absmax == 0.0 {
            return vec![0.0; group.len()];
        }
        // compressed-tensors' rule: the largest magnitude maps to qmax + 1/2.
        let s = scale_up(absmax / (qmax + 0.5));
        group
            .iter()
            .map(|&x| (x / s).round().clamp(-qmax - 1.0, qmax) * s)
            .collect()
    } else {
        let qmax = ((1i32 << bits) - 1) as f32;
        let min = group.iter().fold(0f32, |m, &v| m.min(v));
        let max = group.iter().fold(0f32, |m, &v| m.max(v));
        if max == min {
            return vec![0.0; group.len()];
        }
        let s = scale_up((max - min) / qmax);
        let zero = (-min / s).round().clamp(0.0, qmax);
        group
            .iter()
            .map(|&x| (((x / s).round() + zero).clamp(0.0, qmax) - zero) * s)
            .collect()
    }
}

/// Peak resident memory (`VmHWM`) of a running process, in bytes (Linux).
pub fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmHWM value");
    kib * 1024
}
