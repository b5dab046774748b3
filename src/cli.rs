//! Command-line arguments (clap) and the dispatch of each subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use shardpress_core::recipe::Recipe;

use crate::{client, decompress, genmodel, inspect, local, plan};

#[derive(Parser)]
#[command(
    name = "shardpress",
    version,
    about = "Compress machine-learning models too large for one machine",
    long_about = "Compress machine-learning models too large for one machine.\n\n\
        A coordinator plans the model from its safetensors headers and leases layer-sized tasks \
        to workers; workers range-read their tensors from object storage (file:// or s3://), \
        compress them and write the output shards back. Start with `shardpress demo`.\n\n\
        Exit codes: 0 success; 1 a failure (storage, network, a lost coordinator, a job that \
        failed while running); 2 a job that failed its accuracy gates (report.json written, no \
        manifest); 3 a bad request (arguments, recipe, model or output refused before any work)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Generate a ~200 MB model in a temp dir and compress it with 4 local worker processes.
    Demo(local::DemoArgs),
    /// Start a local coordinator and N worker processes, run one job, shut them down.
    Run(local::RunArgs),
    /// Submit a job to a running coordinator and follow it to the end.
    Compress(client::CompressArgs),
    /// List a coordinator's jobs, newest first.
    Jobs(client::JobsArgs),
    /// Show one job's state and progress.
    Status(client::JobRefArgs),
    /// Follow a job (e.g. one submitted with `compress --no-wait`) to its end and print its
    /// summary, with `compress`'s exit codes.
    Watch(client::JobRefArgs),
    /// Cancel a running job: it stops without a manifest (a job already finalizing ends as
    /// it would have).
    Cancel(client::JobRefArgs),
    /// Serve the coordinator (job and worker gRPC services).
    Coordinator(CoordinatorArgs),
    /// Run a worker that pulls tasks from a coordinator.
    Worker(WorkerArgs),
    /// List a model's tensors, dtypes, sizes and layers (headers only).
    Inspect(inspect::InspectArgs),
    /// Show what a job would do without running it: its tasks, the tensors each pass of the
    /// recipe touches (and those left unchanged), and the output's size in each format.
    Plan(plan::PlanArgs),
    /// Write a synthetic Llama-shaped model with realistic weight statistics.
    GenModel(genmodel::GenModelArgs),
    /// Restore safetensors files (or chosen tensors) from an .spz archive.
    Decompress(decompress::DecompressArgs),
    /// Re-check every object listed in an output's manifest.json against its checksum, and
    /// with --key the manifest's signature.
    Verify(VerifyArgs),
    /// Generate an Ed25519 key pair for signing manifests (`coordinator --signing-key`).
    Keygen(KeygenArgs),
    /// List the built-in recipes (usable as `--recipe NAME`), or print one's YAML.
    Recipes(RecipesArgs),
    /// Compare a compressed model's outputs with the original's on text samples, in this
    /// process, layer by layer (embedding cosine; KL divergence, top-1 agreement and
    /// perplexity). A job does the same across its workers with --eval.
    Eval(crate::eval::EvalArgs),
}

#[derive(Args)]
pub struct CoordinatorArgs {
    /// Address to listen on (port 0 picks a free port, printed on stdout).
    #[arg(long, default_value = "0.0.0.0:50051", env = "SHARDPRESS_LISTEN")]
    pub listen: SocketAddr,
    /// A task whose worker sends no heartbeat for this long is given to another worker.
    #[arg(long, default_value_t = 15.0)]
    pub lease_ttl_secs: f64,
    /// Default task size budget in MB of input.
    #[arg(long, default_value_t = 64)]
    pub task_budget_mb: u64,
    /// Resume the unfinished job whose journal this output location holds (repeatable): its
    /// finished tasks are kept and the rest leased to workers. Submitting the same job to the
    /// same output again resumes it too.
    #[arg(long, value_name = "OUT_URL")]
    pub resume: Vec<String>,
    /// A job claims its output while it runs (OUT/.shardpress/claim.json, renewed every
    /// third of this); another coordinator's job to the same output is refused until the
    /// claim has not been renewed this long (at once if it names a process of this host that
    /// is gone).
    #[arg(long, default_value_t = 30.0)]
    pub claim_ttl_secs: f64,
    /// A task is leased only to a worker whose --memory-limit covers the memory its passes
    /// need (low-rank factors, hashed buckets, a pass that holds a whole tensor); workers
    /// without a limit take anything. While no live worker can take a pending task the job's
    /// status says which task, tensor and pass wait and how much memory they need; if that
    /// lasts this many seconds the job fails with that message. Without any live worker the
    /// job simply waits for one.
    #[arg(long, default_value_t = 60.0)]
    pub unassignable_timeout_secs: f64,
    /// A file holding the admin token: it may do everything, and workers may present it too.
    /// Default: the token in the environment variable SHARDPRESS_ADMIN_TOKEN, if set. With
    /// any token configured, every call must present a valid one (the health service needs
    /// none). Tokens are at least 16 characters: `openssl rand -hex 32` makes one.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// A file holding the worker token: it serves only to run a worker. Default: the token
    /// in SHARDPRESS_WORKER_TOKEN, if set.
    #[arg(long, value_name = "FILE")]
    pub worker_token_file: Option<PathBuf>,
    /// A file of client tokens, one `NAME TOKEN` a line: such a client may submit jobs, and
    /// list, follow and cancel only its own.
    #[arg(long, value_name = "FILE")]
    pub client_tokens_file: Option<PathBuf>,
    /// Listen on a non-loopback address without any token (anyone who reaches the port can
    /// submit, cancel and run tasks). Without it such a coordinator refuses to start.
    #[arg(long)]
    pub insecure: bool,
    /// Serve TLS with this certificate (PEM; its chain first); with --tls-key. Clients and
    /// workers then connect to https://HOST:PORT with --tls-ca.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: every client and worker must present a certificate signed by this CA
    /// (PEM) (their --tls-cert/--tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Accept only submissions whose model and output lie under one of these prefixes (a
    /// path, file:// or s3://bucket/prefix; repeatable; env SHARDPRESS_ALLOW, comma-separated).
    /// Without any, a client on this host may name any location and other hosts none.
    #[arg(
        long = "allow",
        value_name = "PREFIX",
        env = "SHARDPRESS_ALLOW",
        value_delimiter = ','
    )]
    pub allow: Vec<String>,
    /// Also serve HTTP on this address, e.g. 0.0.0.0:9090: Prometheus metrics at /metrics, a
    /// status page at / (jobs, progress and ETA, workers and their tasks, a finished job's
    /// per-layer errors) and its JSON at /api/status. Port 0 picks a free port, printed on
    /// stdout after the gRPC address. Read-only and without a token: keep it on the cluster's
    /// network. Default: off.
    #[arg(long, env = "SHARDPRESS_HTTP_LISTEN", value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,
    /// Fault injection for tests: pause this many ms before writing report and manifest.
    #[arg(long, default_value_t = 0, hide = true)]
    pub debug_finalize_delay_ms: u64,
    /// Sign each job's manifest.json with this Ed25519 secret key (from `shardpress keygen`):
    /// the signature is written as manifest.json.sig, and `verify --key PUBFILE` checks it.
    /// The key is loaded at startup; a missing or bad file stops the coordinator.
    #[arg(long, value_name = "PATH", env = "SHARDPRESS_SIGNING_KEY_FILE")]
    pub signing_key: Option<PathBuf>,
}

#[derive(Args)]
pub struct WorkerArgs {
    /// Coordinator URL (`https://HOST:PORT` when it serves TLS).
    #[arg(long, env = "SHARDPRESS_COORDINATOR")]
    pub coordinator: String,
    #[command(flatten)]
    pub connect: crate::client::ConnectArgs,
    /// Read models and write outputs only under these prefixes (a path, file:// or
    /// s3://bucket/prefix; repeatable; env SHARDPRESS_ALLOW, comma-separated), whatever the
    /// coordinator asks: a task elsewhere is refused. Required when the coordinator is on
    /// another host (or give --allow-any); default for a coordinator on this host: any.
    #[arg(
        long = "allow",
        value_name = "PREFIX",
        env = "SHARDPRESS_ALLOW",
        value_delimiter = ','
    )]
    pub allow: Vec<String>,
    /// Take tasks on any location the coordinator names (trusting it, and TLS, entirely).
    #[arg(long, conflicts_with = "allow")]
    pub allow_any: bool,
    /// Name shown in logs and reports (default: host name and pid).
    #[arg(long)]
    pub name: Option<String>,
    /// Compression threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Largest piece of a tensor held in memory at once, in MB.
    #[arg(long, default_value_t = 16.0)]
    pub chunk_mb: f64,
    /// Bound on the memory a task holds, e.g. 512MB or 2GB (MB = 10^6 bytes, MiB = 2^20). Chunks are made small
    /// enough to fit it; passes that need whole-tensor statistics (per-tensor scales,
    /// magnitude or row/column pruning, k-means) stream the tensor twice, and low-rank,
    /// per-tensor HQQ and hashed sharing stream it once per step of their solver. The limit
    /// is advertised to the coordinator, which leases this worker only tasks whose passes
    /// fit (low-rank factors and hashed buckets are held whole; low-rank or hashed after row
    /// or column pruning holds the whole tensor); a tensor that still cannot fit is refused,
    /// naming the tensor and the memory it needs. Default: no bound.
    #[arg(long, value_parser = parse_size)]
    pub memory_limit: Option<u64>,
    /// Exit when the coordinator has been unreachable this many seconds. A coordinator that
    /// restarts within it finds the worker again (it registers anew) and resumes its jobs.
    #[arg(long, default_value_t = 600)]
    pub unreachable_timeout_secs: u64,
    /// Exit successfully once no task has come for this many seconds (for one-shot runs,
    /// e.g. workers as a Kubernetes Job that completes when the work is done). Default: run
    /// until stopped.
    #[arg(long, value_name = "SECS")]
    pub exit_when_idle: Option<f64>,
    /// Fault injection for tests: sleep this many ms after each chunk.
    #[arg(long, default_value_t = 0, hide = true)]
    pub debug_delay_per_chunk_ms: u64,
    /// Fault injection for tests: pause this many ms before finishing each output, as a
    /// process stopped after its last lease check would.
    #[arg(long, default_value_t = 0, hide = true)]
    pub debug_stall_before_finish_ms: u64,
}

#[derive(Args)]
pub struct RecipesArgs {
    /// Print this built-in recipe's YAML, to copy into a file and edit.
    #[arg(long, value_name = "NAME")]
    pub show: Option<String>,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Output directory URL or path (holding manifest.json).
    pub out: String,
    /// Public key file (PREFIX.pub from `shardpress keygen`): the manifest's signature
    /// (manifest.json.sig) must be this key's over manifest.json's exact bytes; a missing,
    /// foreign or broken signature fails. Without it the signature is not checked.
    #[arg(long, value_name = "PUBFILE")]
    pub key: Option<PathBuf>,
}

#[derive(Args)]
pub struct KeygenArgs {
    /// Writes PREFIX.key (the secret key, mode 0600: give it to the coordinator only) and
    /// PREFIX.pub (the public key, for `verify --key`).
    #[arg(long, value_name = "PREFIX")]
    pub out: PathBuf,
    /// Replace existing key files.
    #[arg(long)]
    pub force: bool,
}

/// Loads `--recipe`: a built-in name or a YAML file.
pub fn load_recipe(spec: &str) -> anyhow::Result<String> {
    if let Some(recipe) = Recipe::preset(spec) {
        return Ok(recipe.source_yaml);
    }
    let path = PathBuf::from(spec);
    let bad = |e: anyhow::Error| anyhow::Error::new(crate::BadRequest(format!("{e:#}")));
    let yaml = std::fs::read_to_string(&path)
        .with_context(|| {
            format!(
                "recipe {spec:?} is neither a built-in ({}) nor a readable file",
                Recipe::preset_names().join(", ")
            )
        })
        .map_err(bad)?;
    Recipe::from_yaml(&yaml)
        .with_context(|| format!("recipe file {}", path.display()))
        .map_err(bad)?;
    Ok(yaml)
}

pub async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => local::demo(args).await,
        Command::Run(args) => local::run(args).await,
        Command::Compress(args) => client::compress(args).await,
        Command::Jobs(args) => client::jobs(args).await,
        Command::Status(args) => client::status(args).await,
        Command::Watch(args) => client::watch_job(args).await,
        Command::Cancel(args) => client::cancel(args).await,
        Command::Coordinator(args) => local::serve_coordinator(args).await,
        Command::Worker(args) => run_worker(args).await,
        Command::Inspect(args) => inspect::inspect(args).await,
        Command::Plan(args) => plan::plan(args).await,
        Command::GenModel(args) => genmodel::gen_model(args),
        Command::Verify(args) => client::verify(&args.out, args.key.as_deref()).await,
        Command::Keygen(args) => keygen(args),
        Command::Decompress(args) => decompress::decompress(args).await,
        Command::Recipes(RecipesArgs { show: Some(name) }) => {
            let recipe = Recipe::preset(&name)
                .with_context(|| {
                    format!(
                        "no built-in recipe {name:?}; the built-ins are {}",
                        Recipe::preset_names().join(", ")
                    )
                })
                .map_err(|e| anyhow::Error::new(crate::BadRequest(format!("{e:#}"))))?;
            say!("{}", recipe.source_yaml.trim_end());
            Ok(())
        }
        Command::Eval(args) => crate::eval::eval(args).await,
        Command::Recipes(RecipesArgs { show: None }) => {
            for name in Recipe::preset_names() {
                if let Some(recipe) = Recipe::preset(name) {
                    say!("{}", recipe.describe());
                }
            }
            say!(
                "\nOutput formats: --format safetensors (dequantized, any loader reads it), \
                 --format compressed-tensors (w4a16, w4a16-asym, w4a16-hqq, 2of4-w4a16, w8a16, \
                 int8, int8-g128, fp8: packed codes that vLLM and transformers load), --format gguf (q8_0, q4_0, q4_k_m, \
                 q6_k: one model.gguf that llama.cpp and ollama load; llama-family models) \
                 or --format spz (compact codes, \
                 entropy-coded; `shardpress decompress` restores)."
            );
            Ok(())
        }
    }
}

async fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
    let allow = match (args.allow.is_empty(), args.allow_any) {
        (false, _) => {
            Some(shardpress_store::allow::AllowList::new(&args.allow).context("invalid --allow")?)
        }
        (true, true) => None,
        (true, false) if coordinator_is_local(&args.coordinator) => None,
        (true, false) => bail_bad(format!(
            "the coordinator {} is on another host: give --allow PREFIX for the model and \
             output locations this worker may read and write (or --allow-any to trust the \
             coordinator with any)",
            args.coordinator
        ))?,
    };
    let config = shardpress_worker::WorkerConfig {
        security: args.connect.security()?,
        allow,
        coordinator_url: args.coordinator,
        name: args
            .name
            .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
        threads: args.threads,
        chunk_bytes: (args.chunk_mb.max(1.0 / 16.0) * 1024.0 * 1024.0) as usize,
        memory_limit: args.memory_limit,
        unreachable_timeout: Duration::from_secs(args.unreachable_timeout_secs),
        exit_when_idle: match args.exit_when_idle {
            Some(secs) if secs.is_finite() && secs > 0.0 => Some(Duration::from_secs_f64(secs)),
            Some(_) => bail_bad("--exit-when-idle must be a positive number of seconds".into())?,
            None => None,
        },
        delay_per_chunk: Duration::from_millis(args.debug_delay_per_chunk_ms),
        stall_before_finish: Duration::from_millis(args.debug_stall_before_finish_ms),
    };
    shardpress_worker::run_worker(config, shutdown_signal()).await?;
    Ok(())
}

/// A bad-request error (exit code 3).
fn bail_bad<T>(message: String) -> anyhow::Result<T> {
    Err(anyhow::Error::new(crate::BadRequest(message)))
}

/// Whether a coordinator URL names this host (a loopback address or `localhost`).
fn coordinator_is_local(url: &str) -> bool {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `keygen`: a key pair from the operating system's random generator.
fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    use rand::TryRngCore;
    use shardpress_coordinator::signing::{write_key_pair, SigningKey};
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .context("cannot get random bytes from the operating system for a key")?;
    let key = SigningKey::from_seed(seed);
    let (secret, public) = write_key_pair(&args.out, &key, args.force)?;
    say!(
        "key {}: secret key in {} (keep it private), public key in {}",
        key.id(),
        secret.display(),
        public.display()
    );
    Ok(())
}

/// Listens for SIGINT and SIGTERM from now on (unlike [`shutdown_signal`], which starts
/// listening when first polled); resolves when one arrives.
pub fn shutdown_listener() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A size such as `512MB`, `2GB`, `1.5G`, `300MiB` or `1048576` (bytes): KB/MB/GB/TB (or
/// K/M/G/T) are powers of 1000, as in `gen-model --size`; KiB/MiB/GiB/TiB powers of 1024.
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 512MB or 2GB"))?;
    let unit_bytes: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "K" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use MB or GB)"
            ))
        }
    };
    let bytes = number * unit_bytes;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is not a positive size"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::{coordinator_is_local, parse_size};

    #[test]
    fn local_coordinators_are_told_apart() {
        assert!(coordinator_is_local("http://127.0.0.1:50051"));
        assert!(coordinator_is_local("https://localhost:1"));
        assert!(coordinator_is_local("http://[::1]:50051"));
        assert!(!coordinator_is_local("http://10.0.0.5:50051"));
        assert!(!coordinator_is_local(
            "https://shardpress-coordinator:50051"
        ));
        assert!(!coordinator_is_local("http://127.0.0.1.evil.example:50051"));
    }

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_size("512MB"), Ok(512_000_000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1.5g"), Ok(1_500_000_000));
        assert_eq!(parse_size("300MiB"), Ok(300 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("0MB").is_err());
    }
}
