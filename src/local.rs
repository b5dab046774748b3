//! Local modes: `coordinator` (serve), `run` (a coordinator in this process plus N worker
//! processes of this same binary on loopback, for one job) and `demo` (the embedded default).

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use shardpress_coordinator::auth::AuthConfig;
use shardpress_coordinator::http;
use shardpress_coordinator::journal::Claimant;
use shardpress_coordinator::signing::SigningKey;
use shardpress_coordinator::{Coordinator, CoordinatorConfig, ServerSecurity, ServerTls};
use shardpress_proto::transport::ClientSecurity;
use shardpress_store::allow::AllowList;
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
    /// Sign the manifest with this Ed25519 secret key (see `coordinator --signing-key`).
    #[arg(long, value_name = "PATH", env = "SHARDPRESS_SIGNING_KEY_FILE")]
    pub signing_key: Option<std::path::PathBuf>,
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
    let security = server_security(&args)?;
    config.signing_key = load_signing_key(args.signing_key.as_deref())?;
    let (listener, addr) = shardpress_coordinator::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    say!("shardpress coordinator listening on {addr}");
    tracing::info!(
        tls = security.tls.is_some(),
        mutual_tls = security.tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some()),
        tokens = security.auth.requires_tokens(),
        allow = %security.auth.allow.describe(),
        "security"
    );
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
    shardpress_coordinator::serve(listener, coordinator, security, shutdown_signal()).await?;
    let _ = stop_http.send(());
    if let Some(http) = http {
        http.await?
            .context("the HTTP server (--http-listen) failed")?;
    }
    Ok(())
}

/// The coordinator's tokens, TLS files and `--allow` prefixes, read and checked. A
/// coordinator listening beyond loopback without any token refuses to start unless
/// `--insecure`.
fn server_security(args: &CoordinatorArgs) -> anyhow::Result<ServerSecurity> {
    let bad = |e: anyhow::Error| anyhow::Error::new(crate::BadRequest(format!("{e:#}")));
    let token = |file: &Option<std::path::PathBuf>, env: &str| -> anyhow::Result<Option<String>> {
        Ok(ClientSecurity::token_from(file.as_deref(), env)?)
    };
    let auth = AuthConfig {
        admin_token: token(&args.admin_token_file, "SHARDPRESS_ADMIN_TOKEN").map_err(bad)?,
        worker_token: token(&args.worker_token_file, "SHARDPRESS_WORKER_TOKEN").map_err(bad)?,
        client_tokens: match &args.client_tokens_file {
            Some(path) => AuthConfig::read_client_tokens(path).map_err(|e| bad(e.into()))?,
            None => Vec::new(),
        },
        allow: AllowList::new(&args.allow)
            .context("invalid --allow")
            .map_err(bad)?,
    };
    auth.validate().map_err(|e| bad(e.into()))?;
    if !auth.requires_tokens() && !args.listen.ip().is_loopback() && !args.insecure {
        return Err(bad(anyhow::anyhow!(
            "refusing to listen on {} without a token: anyone reaching it could submit, \
             cancel and fake tasks. Give --admin-token-file (or SHARDPRESS_ADMIN_TOKEN), \
             listen on 127.0.0.1, or pass --insecure to accept the risk",
            args.listen
        )));
    }
    if !auth.requires_tokens() && !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen, "--insecure: serving without any token");
    }
    let read = |what, path: &std::path::Path| {
        shardpress_proto::transport::read_file(what, path).map_err(|e| bad(e.into()))
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls {
            cert_pem: read("certificate", cert)?,
            key_pem: read("private key", key)?,
            client_ca_pem: args
                .tls_client_ca
                .as_deref()
                .map(|ca| read("client CA certificate", ca))
                .transpose()?,
        }),
        _ => None,
    };
    Ok(ServerSecurity { auth, tls })
}

/// `--signing-key`: the secret key, loaded at startup so that a bad file stops the command
/// before any job runs.
fn load_signing_key(
    path: Option<&std::path::Path>,
) -> anyhow::Result<Option<std::sync::Arc<SigningKey>>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let key = SigningKey::load(path).context("cannot load the --signing-key")?;
    tracing::info!(key = %key.id(), "signing manifests with the key in {}", path.display());
    Ok(Some(std::sync::Arc::new(key)))
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
    fn spawn(
        count: usize,
        threads: usize,
        coordinator: SocketAddr,
        token: &str,
    ) -> anyhow::Result<Self> {
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
                .env("SHARDPRESS_TOKEN", token)
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
    config.signing_key = load_signing_key(args.signing_key.as_deref())?;
    let threads = match args.threads {
        0 => (std::thread::available_parallelism().map_or(1, |n| n.get()) / args.workers).max(1),
        n => n,
    };
    let (listener, addr) = shardpress_coordinator::bind(([127, 0, 0, 1], 0).into()).await?;
    config.claimant = Claimant::this_process(&addr.to_string());
    let coordinator = Coordinator::new(config);
    // A token of this run only: other users of this host cannot use its coordinator.
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let security = ServerSecurity {
        auth: AuthConfig {
            admin_token: Some(token.clone()),
            ..AuthConfig::default()
        },
        tls: None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(shardpress_coordinator::serve(
        listener,
        coordinator,
        security,
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut workers = LocalWorkers::spawn(args.workers, threads, addr, &token)?;
    eprintln!(
        "local cluster: coordinator on {addr}, {} worker processes x {threads} threads",
        args.workers
    );
    let outcome = async {
        let security = ClientSecurity {
            token: Some(token.clone()),
            tls: None,
        };
        let mut client =
            client::connect_with(&format!("http://{addr}"), &security, Duration::from_secs(10))
                .await?;
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
            calibration: None,
            calibration_samples: None,
            calibration_seq_len: None,
            eval: None,
            eval_samples: None,
            target_bpw: None,
        },
        workers: args.workers,
        threads: 0,
        lease_ttl_secs: 15.0,
        signing_key: None,
    })
    .await?;
    client::verify(&out_dir.display().to_string(), None).await?;
    if args.keep_in.is_some() {
        say!(
            "model in {}, output in {}",
            model_dir.display(),
            out_dir.display()
        );
    }
    Ok(())
}
