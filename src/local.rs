//! Local modes: `coordinator` (serve), `run` (a coordinator in this process plus N worker
//! processes of this same binary on loopback, for one job) and `demo` (the embedded default).

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use shardpress_coordinator::http;
use shardpress_coordinator::journal::Claimant;
use shardpress_coordinator::{Coordinator, CoordinatorConfig};
use tokio::process::{Child, Command};

use crate::cli::{shutdown_signal, CoordinatorArgs};
use crate::client::{self, JobArgs};
use crate::genmodel;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Number of worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Compression threads per worker (0 = cores / workers).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Lease time-to-live in seconds.
    #[arg(long, default_value_t = 15.0)]
    pub lease_ttl_secs: f64,
}

#[derive(Args)]
pub struct DemoArgs {
    /// Number of worker processes.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Size of the generated model.
    #[arg(long, default_value = "200MB")]
    pub size: String,
    /// Recipe to apply.
    #[arg(long, default_value = "int4-g128")]
    pub recipe: String,
    /// Keep the generated model and output in this directory instead of a temp dir.
    #[arg(long)]
    pub keep_in: Option<std::path::PathBuf>,
}

fn coordinator_config(
    lease_ttl_secs: f64,
    task_budget_mb: u64,
) -> anyhow::Result<CoordinatorConfig> {
    if !(lease_ttl_secs.is_finite() && lease_ttl_secs > 0.0) {
        bail!("--lease-ttl-secs must be a positive number of seconds");
    }
    let mut config = CoordinatorConfig {
        lease_ttl: Duration::from_secs_f64(lease_ttl_secs),
        ..CoordinatorConfig::default()
    };
    if task_budget_mb > 0 {
        config.default_task_budget = task_budget_mb * 1024 * 1024;
    }
    Ok(config)
}

pub async fn serve_coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let mut config = coordinator_config(args.lease_ttl_secs, args.task_budget_mb)?;
    config.finalize_delay = Duration::from_millis(args.debug_finalize_delay_ms);
    if !(args.unassignable_timeout_secs.is_finite() && args.unassignable_timeout_secs >= 0.0) {
        bail!("--unassignable-timeout-secs must be a number of seconds, 0 or more");
    }
    config.unassignable_timeout = Duration::from_secs_f64(args.unassignable_timeout_secs);
    let (listener, addr) = shardpress_coordinator::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    say!("shardpress coordinator listening on {addr}");
    let http = match args.http_listen {
        Some(at) => Some(bind_http(at).await?),
        None => None,
    };
    std::io::stdout().flush().ok();
    config.claimant = Claimant::this_process(&addr.to_string());
    config.claim_ttl = Duration::from_secs_f64(args.claim_ttl_secs.max(1.0));
    let coordinator = Coordinator::new(config);
    for out in &args.resume {
        let submitted = shardpress_coordinator::submit::resume(&coordinator, out)
            .await
            .with_context(|| format!("cannot resume the job in {out}"))?;
        tracing::info!(job = %submitted.job_id, tasks = submitted.task_count,
            finished = submitted.resumed_tasks, "resumed the job in {out}");
    }
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = http.map(|listener| {
        let stopped = async {
            let _ = http_stopped.await;
        };
        tokio::spawn(http::serve(listener, coordinator.clone(), stopped))
    });
    shardpress_coordinator::serve(listener, coordinator, shutdown_signal()).await?;
    let _ = stop_http.send(());
    if let Some(http) = http {
        http.await?
            .context("the HTTP server (--http-listen) failed")?;
    }
    Ok(())
}

/// Binds the HTTP port of `--http-listen` and says where it is, after the gRPC address.
async fn bind_http(at: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let (listener, addr) = shardpress_coordinator::bind(at)
        .await
        .with_context(|| format!("cannot listen on {at} for HTTP (--http-listen)"))?;
    say!("shardpress coordinator metrics and status page listening on {addr}");
    Ok(listener)
}

/// Worker processes of this binary; killed when dropped.
struct LocalWorkers {
    children: Vec<Child>,
}

impl LocalWorkers {
    fn spawn(count: usize, threads: usize, coordinator: SocketAddr) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the shardpress binary")?;
        let mut children = Vec::with_capacity(count);
        for i in 0..count {
            let child = Command::new(&exe)
                .args(["worker", "--coordinator", &format!("http://{coordinator}")])
                .args([
                    "--name",
                    &format!("local-{i}"),
                    "--threads",
                    &threads.to_string(),
                ])
                .args(["--unreachable-timeout-secs", "10"])
                .env(
                    "SHARDPRESS_LOG",
                    std::env::var("SHARDPRESS_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start worker process {}", exe.display()))?;
            children.push(child);
        }
        Ok(Self { children })
    }

    /// Resolves when every worker process has exited.
    async fn all_exited(&mut self) -> usize {
        let mut failed = 0;
        for child in &mut self.children {
            if !child.wait().await.map(|s| s.success()).unwrap_or(false) {
                failed += 1;
            }
        }
        failed
    }

    async fn stop(mut self) {
        for child in &mut self.children {
            let _ = child.kill().await;
        }
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    // Listening from the start: SIGTERM or Ctrl-C must stop the worker processes too, which
    // the default action (ending this process at once) would leave running.
    let interrupted = crate::cli::shutdown_listener()?;
    let mut config = coordinator_config(args.lease_ttl_secs, args.job.task_budget_mb)?;
    let threads = match args.threads {
        0 => (std::thread::available_parallelism().map_or(1, |n| n.get()) / args.workers).max(1),
        n => n,
    };
    let (listener, addr) = shardpress_coordinator::bind(([127, 0, 0, 1], 0).into()).await?;
    config.claimant = Claimant::this_process(&addr.to_string());
    let coordinator = Coordinator::new(config);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(shardpress_coordinator::serve(
        listener,
        coordinator,
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut workers = LocalWorkers::spawn(args.workers, threads, addr)?;
    eprintln!(
        "local cluster: coordinator on {addr}, {} worker processes x {threads} threads",
        args.workers
    );
    let outcome = async {
        let mut client = client::connect(&format!("http://{addr}"), Duration::from_secs(10)).await?;
        let job_id = client::submit(&mut client, &args.job).await?;
        let status = tokio::select! {
            status = client::watch(&mut client, &job_id) => status?,
            failed = workers.all_exited() => {
                bail!("all {} worker processes exited ({failed} with an error) before the job finished", args.workers)
            }
            () = interrupted => bail!("interrupted: job {job_id} stopped with its worker processes, unfinished (no manifest written)"),
        };
        let report = client::report(&mut client, &job_id).await;
        Ok((status, report))
    }
    .await;
    workers.stop().await;
    let _ = stop_tx.send(());
    let _ = server.await;
    let (status, report) = outcome?;
    client::finish(&status, &report)
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let temp;
    let dir = match &args.keep_in {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("shardpress-demo-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let model_dir = dir.join("model");
    let out_dir = dir.join("out");
    let started = std::time::Instant::now();
    let gen = genmodel::GenModelArgs::for_demo(&model_dir, &args.size);
    let model = tokio::task::spawn_blocking(move || genmodel::generate(&gen)).await??;
    eprintln!(
        "generated {} ({} tensors, {:.1} MB) in {:.1}s",
        model_dir.display(),
        model.tensors,
        model.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    run(RunArgs {
        job: JobArgs {
            model: model_dir.display().to_string(),
            recipe: args.recipe.clone(),
            out: out_dir.display().to_string(),
            task_budget_mb: 0,
            format: None,
            max_file_mb: None,
            assembly_slice_mib: None,
            allow_unmatched: false,
            // The demo's own folder: a second run replaces the first's output.
            overwrite: true,
        },
        workers: args.workers,
        threads: 0,
        lease_ttl_secs: 15.0,
    })
    .await?;
    client::verify(&out_dir.display().to_string()).await?;
    if args.keep_in.is_some() {
        say!(
            "model in {}, output in {}",
            model_dir.display(),
            out_dir.display()
        );
    }
    Ok(())
}
