//! The job client: submit to a coordinator, follow the job's progress stream with a progress
//! bar and ETA, and print the report's summary; list, show, follow and cancel jobs (`--json`
//! for scripts). Also `verify`.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use shardpress_core::recipe::Recipe;
use shardpress_proto::transport::{AuthChannel, ClientSecurity};
use shardpress_proto::v1::{
    CancelJobRequest, GetJobRequest, JobState, JobStatus, ListJobsRequest, SubmitJobRequest,
};
use shardpress_proto::JobServiceClient;
use shardpress_store::StoreLocation;
use tokio_stream::StreamExt;

use crate::cli::load_recipe;
use crate::summary::print_summary;

#[derive(Args, Clone)]
pub struct JobArgs {
    /// Model: a .safetensors file or a model directory (path, file://, s3://).
    #[arg(long)]
    pub model: String,
    /// Recipe: a built-in name (see `shardpress recipes`) or a YAML file.
    #[arg(long, default_value = "int4-g128")]
    pub recipe: String,
    /// Output directory (path, file://, s3://).
    #[arg(long)]
    pub out: String,
    /// Task size budget in MB of input (0 = the coordinator's default).
    #[arg(long, default_value_t = 0)]
    pub task_budget_mb: u64,
    /// Output format: safetensors (dequantized shards, any loader), compressed-tensors
    /// (packed int4/int8 or FP8 shards that vLLM and transformers load), gguf (one
    /// model.gguf of llama.cpp block types for llama.cpp and ollama; recipes q8_0, q4_0,
    /// q4_k_m, q6_k; llama, mistral, qwen2, qwen3) or spz (one compact archive; restore with
    /// `shardpress decompress`). Default: the recipe's (safetensors unless it says otherwise).
    #[arg(long, value_parser = ["safetensors", "compressed-tensors", "gguf", "spz"])]
    pub format: Option<String>,
    /// GGUF: split the output into llama.cpp's `model-0000k-of-0000n.gguf` files of at most
    /// this many MB of tensors each (llama.cpp loads them from the first file's name; Hugging
    /// Face takes files up to 50 GB). Default: one `model.gguf`.
    #[arg(long)]
    pub max_file_mb: Option<u64>,
    /// .spz and GGUF: the workers assemble each output file in slices of this many MiB at
    /// once (a power of two; on S3 at least 8, S3's parts being at least 5 MiB). Default: 64.
    #[arg(long, value_name = "MIB")]
    pub assembly_slice_mib: Option<u64>,
    /// Run even if an entry of the recipe's `targets` or `ignore` selects no tensor of the
    /// model (printed as a warning); without it such a recipe is refused. Built-in recipes
    /// are not checked.
    #[arg(long)]
    pub allow_unmatched: bool,
    /// Replace an earlier output in --out: what its manifest.json lists (and the parts of an
    /// unfinished job) is removed first, nothing else. Without it a non-empty --out is
    /// refused.
    #[arg(long)]
    pub overwrite: bool,
    /// Calibration samples for a calibrated recipe (gptq-w4a16-asym, awq-w4a16-asym,
    /// sparsegpt-2of4, wanda-2of4, or a recipe with quantize method gptq/awq or prune method
    /// sparsegpt/wanda): a text file with one sample a line, or JSONL with a "text" field
    /// (path, file://, s3://). The model's directory must hold config.json and
    /// tokenizer.json (Llama-family decoders and BERT-family encoders).
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<String>,
    /// How many samples of --calibration to use (the first N). Default: 128.
    #[arg(long, value_name = "N")]
    pub calibration_samples: Option<u32>,
    /// Tokens per sample at most, for --calibration and --eval. Default: 512.
    #[arg(long, value_name = "TOKENS")]
    pub calibration_seq_len: Option<u32>,
    /// Compare the compressed model's outputs with the original's on these samples (same
    /// form as --calibration): embedding cosine for encoders; KL divergence, top-1 agreement
    /// and perplexity for decoders. Written to report.json; the recipe's gates
    /// min_embedding_cosine, min_top1 and max_kld check them.
    #[arg(long, value_name = "FILE")]
    pub eval: Option<String>,
    /// How many samples of --eval to use (the first N). Default: 256.
    #[arg(long, value_name = "N")]
    pub eval_samples: Option<u32>,
    /// Mixed precision to a bit budget: every tensor the recipe quantizes gets its own width
    /// (3, 4, 5, 6 or 8 bits; 4 or 8 for compressed-tensors; Q4_K, Q5_K, Q6_K or Q8_0 for
    /// a gguf recipe such as q4_k_m; a recipe's
    /// `mixed_precision.candidates` names others, and may change the group size too:
    /// `[4, "4g32", "8c"]`) so that together they store at most this many bits per weight
    /// (scales and zero points included) with the least predicted error. The job first
    /// encodes every tensor at every candidate width (a measuring round) and scores each
    /// width: with --calibration, by the error it causes in its layer's output on held-out
    /// calibration samples, else by its relative weight error. It then compresses (with a
    /// calibrated recipe: calibrates each tensor at its chosen width).
    /// report.json's `mixed_precision` lists every tensor's width. Sets the recipe's
    /// `mixed_precision.target_bpw`.
    #[arg(long, value_name = "BITS")]
    pub target_bpw: Option<f64>,
}

/// Which coordinator to talk to, and how.
#[derive(Args, Clone)]
pub struct CoordinatorUrl {
    /// Coordinator URL (`https://HOST:PORT` when it serves TLS).
    #[arg(
        long,
        env = "SHARDPRESS_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// The credentials and TLS settings of a connection to the coordinator (clients and workers).
#[derive(Args, Clone, Default)]
pub struct ConnectArgs {
    /// A file holding the token to present (a coordinator with tokens refuses calls without
    /// one). Default: the token in the environment variable SHARDPRESS_TOKEN, if set.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// The CA certificate (PEM) that signed the coordinator's certificate; needed for an
    /// `https://` coordinator URL.
    #[arg(long, value_name = "FILE", env = "SHARDPRESS_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// A certificate (PEM) to present to a coordinator that requires mutual TLS
    /// (`coordinator --tls-client-ca`); with --tls-key.
    #[arg(long, value_name = "FILE", env = "SHARDPRESS_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", env = "SHARDPRESS_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The name the coordinator's certificate must carry, when it differs from the URL's
    /// host (e.g. connecting by IP address).
    #[arg(long, value_name = "NAME")]
    pub tls_domain: Option<String>,
}

impl ConnectArgs {
    /// Reads the token and the TLS files.
    pub fn security(&self) -> anyhow::Result<ClientSecurity> {
        Ok(ClientSecurity {
            token: ClientSecurity::token_from(self.token_file.as_deref(), "SHARDPRESS_TOKEN")?,
            tls: ClientSecurity::tls_from(
                self.tls_ca.as_deref(),
                self.tls_cert.as_deref(),
                self.tls_key.as_deref(),
                self.tls_domain.clone(),
            )?,
        })
    }
}

/// The job service's client; every call carries the token.
pub type JobClient = JobServiceClient<AuthChannel>;

#[derive(Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub coordinator: CoordinatorUrl,
    /// One JSON array of job objects instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct JobRefArgs {
    /// The job's id (as `compress --no-wait` prints it, or `jobs` lists it).
    pub job: String,
    #[command(flatten)]
    pub coordinator: CoordinatorUrl,
    /// A JSON object instead of a line (not for `watch`, which prints the job's summary).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CompressArgs {
    #[command(flatten)]
    pub coordinator: CoordinatorUrl,
    #[command(flatten)]
    pub job: JobArgs,
    /// Submit and print the job id without waiting.
    #[arg(long)]
    pub no_wait: bool,
    /// If the coordinator goes away while the job runs, wait this many seconds for it to
    /// come back, then submit the job again: it resumes from its journal in --out (finished
    /// tasks are kept). 0: exit at once (code 1).
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub reconnect_secs: u64,
}

/// The coordinator stopped answering while a job was followed.
#[derive(Debug)]
pub struct LostCoordinator(String);

impl std::fmt::Display for LostCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lost the coordinator: {}", self.0)
    }
}

impl std::error::Error for LostCoordinator {}

pub async fn compress(args: CompressArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.coordinator, Duration::from_secs(3)).await?;
    let job_id = submit(&mut client, &args.job).await?;
    if args.no_wait {
        say!("{job_id}");
        return Ok(());
    }
    let mut job_id = job_id;
    let status = loop {
        let lost = match watch(&mut client, &job_id).await {
            Ok(status) => break status,
            Err(e) if args.reconnect_secs > 0 && e.is::<LostCoordinator>() => e,
            Err(e) => return Err(e),
        };
        eprintln!(
            "{lost}; waiting up to {} s for it to come back (--reconnect-secs)",
            args.reconnect_secs
        );
        (client, job_id) = resubmit(&args, &job_id).await?;
    };
    let report = report(&mut client, &job_id).await;
    finish(&status, &report)
}

/// Reconnects to a coordinator that went away, and submits the job again if the coordinator
/// no longer knows it (it restarted): the job resumes from its journal. Returns the client
/// and the job's id.
async fn resubmit(args: &CompressArgs, job_id: &str) -> anyhow::Result<(JobClient, String)> {
    let patience = Duration::from_secs(args.reconnect_secs);
    let started = std::time::Instant::now();
    let mut client = loop {
        let left = patience.saturating_sub(started.elapsed());
        let mut client = connect(&args.coordinator, left).await?;
        let known = client
            .get_job(GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await;
        match known {
            Ok(_) => return Ok((client, job_id.to_string())),
            Err(status) if status.code() == tonic::Code::NotFound => break client,
            // A connection to a coordinator still going down or coming up: try again.
            Err(_) if started.elapsed() < patience => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(status) => bail!(
                "the coordinator did not come back within --reconnect-secs: {}",
                status.message()
            ),
        }
    };
    // The first submission replaced any earlier output; this one must keep the journal.
    let job = JobArgs {
        overwrite: false,
        ..args.job.clone()
    };
    loop {
        match submit(&mut client, &job).await {
            Ok(id) => return Ok((client, id)),
            // The old coordinator's claim on the output lapses after its TTL.
            Err(e)
                if format!("{e:#}").contains("is claimed by") && started.elapsed() < patience =>
            {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connects to the coordinator, retrying for up to `patience` while it starts.
pub async fn connect(target: &CoordinatorUrl, patience: Duration) -> anyhow::Result<JobClient> {
    connect_with(&target.coordinator, &target.connect.security()?, patience).await
}

/// [`connect`] with settings already read.
pub async fn connect_with(
    url: &str,
    security: &ClientSecurity,
    patience: Duration,
) -> anyhow::Result<JobClient> {
    let (channel, credentials) =
        shardpress_proto::transport::connect(url, security, patience).await?;
    Ok(JobServiceClient::with_interceptor(channel, credentials)
        .max_decoding_message_size(shardpress_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(shardpress_proto::MAX_MESSAGE_BYTES))
}

/// A relative path means relative to where the client runs, not the coordinator's working
/// directory: sent absolute. URLs are sent as they are.
fn resolved_here(path_or_url: &str) -> anyhow::Result<String> {
    if path_or_url.contains("://") {
        return Ok(path_or_url.to_string());
    }
    let path = std::path::absolute(path_or_url)
        .with_context(|| format!("cannot resolve the path {path_or_url:?}"))?;
    Ok(path.display().to_string())
}

pub async fn submit(client: &mut JobClient, job: &JobArgs) -> anyhow::Result<String> {
    let request = SubmitJobRequest {
        model_url: resolved_here(&job.model)?,
        out_url: resolved_here(&job.out)?,
        recipe_yaml: match job.target_bpw {
            None => load_recipe(&job.recipe)?,
            Some(bpw) => Recipe::with_target_bpw(&load_recipe(&job.recipe)?, bpw)
                .map_err(|e| crate::BadRequest(format!("--target-bpw {bpw}: {e}")))?,
        },
        task_budget_bytes: job.task_budget_mb * 1024 * 1024,
        format: job.format.clone().unwrap_or_default(),
        max_file_bytes: job.max_file_mb.map_or(0, |mb| mb.saturating_mul(1_000_000)),
        assembly_slice_bytes: job
            .assembly_slice_mib
            .map_or(0, |mib| mib.saturating_mul(1 << 20)),
        allow_unmatched: job.allow_unmatched,
        overwrite: job.overwrite,
        calibration_url: job
            .calibration
            .as_deref()
            .map(resolved_here)
            .transpose()?
            .unwrap_or_default(),
        calibration_samples: job.calibration_samples.unwrap_or(0),
        calibration_seq_len: job.calibration_seq_len.unwrap_or(0),
        eval_url: job
            .eval
            .as_deref()
            .map(resolved_here)
            .transpose()?
            .unwrap_or_default(),
        eval_samples: job.eval_samples.unwrap_or(0),
    };
    let response = client
        .submit_job(request)
        .await
        .map_err(|status| match status.code() {
            // Refused for what was asked (recipe, model, output, credentials), not for a
            // fault.
            tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated => {
                anyhow::Error::new(crate::BadRequest(status.message().to_string()))
            }
            _ => anyhow::anyhow!("{}", status.message()),
        })
        .context("job rejected")?
        .into_inner();
    for warning in &response.warnings {
        eprintln!("warning: {warning}");
    }
    eprintln!(
        "job {}: {} tasks, {:.1} MB of input",
        response.job_id,
        response.task_count,
        response.total_bytes as f64 / 1e6
    );
    if response.resumed_tasks > 0 {
        eprintln!(
            "resuming: {} of {} tasks were finished by an earlier run of this job (journal in {})",
            response.resumed_tasks, response.task_count, job.out
        );
    }
    Ok(response.job_id)
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// Follows the job until it ends; returns its final status.
pub async fn watch(client: &mut JobClient, job_id: &str) -> anyhow::Result<JobStatus> {
    let mut stream = client
        .watch_job(GetJobRequest {
            job_id: job_id.to_string(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound | tonic::Code::InvalidArgument => {
                anyhow::anyhow!("{}", s.message())
            }
            _ => anyhow::Error::new(LostCoordinator(s.message().to_string())),
        })?
        .into_inner();
    let interactive = std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    let mut last_line = (u32::MAX, i32::MAX);
    let mut last = None;
    while let Some(status) = stream.next().await {
        let status = status.map_err(|s| LostCoordinator(s.message().to_string()))?;
        let message = format!(
            "tasks {}/{} ({} running, {} workers{})",
            status.tasks_done,
            status.tasks_total,
            status.tasks_running,
            status.workers,
            if status.task_retries > 0 {
                format!(", {} retried", status.task_retries)
            } else {
                String::new()
            }
        );
        // While running, a job's message says which round it is in (global pruning).
        let message = if status.state() == JobState::Running && !status.message.is_empty() {
            format!("{message}; {}", status.message)
        } else {
            message
        };
        if interactive {
            let bar = bar.get_or_insert_with(|| progress_bar(status.bytes_total));
            bar.set_position(status.bytes_done);
            bar.set_message(message);
        } else if (status.tasks_done, status.state) != last_line {
            last_line = (status.tasks_done, status.state);
            let state = status.state().label();
            eprintln!(
                "[{state}] {message}, {:.1}/{:.1} MB",
                status.bytes_done as f64 / 1e6,
                status.bytes_total as f64 / 1e6
            );
        }
        last = Some(status);
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match last {
        Some(status) if status.is_terminal() => Ok(status),
        _ => {
            let status = client
                .get_job(GetJobRequest {
                    job_id: job_id.to_string(),
                })
                .await
                .map_err(|s| LostCoordinator(s.message().to_string()))?;
            Ok(status.into_inner())
        }
    }
}

/// A job's status as a JSON object, for scripts.
fn status_json(status: &JobStatus) -> serde_json::Value {
    serde_json::json!({
        "job_id": status.job_id,
        "state": status.state().label(),
        "tasks_total": status.tasks_total,
        "tasks_done": status.tasks_done,
        "tasks_running": status.tasks_running,
        "bytes_total": status.bytes_total,
        "bytes_done": status.bytes_done,
        "task_retries": status.task_retries,
        "workers": status.workers,
        "message": status.message,
        "model_url": status.model_url,
        "out_url": status.out_url,
        "recipe": status.recipe,
    })
}

/// A job's status in one line.
fn status_line(status: &JobStatus) -> String {
    let mut line = format!(
        "{}  {:<10} tasks {}/{}  {:.1}/{:.1} MB  {} -> {}",
        status.job_id,
        status.state().label(),
        status.tasks_done,
        status.tasks_total,
        status.bytes_done as f64 / 1e6,
        status.bytes_total as f64 / 1e6,
        status.model_url,
        status.out_url
    );
    if !status.message.is_empty() {
        line.push_str(&format!("  ({})", status.message));
    }
    line
}

/// Prints a job's status: a JSON object or a line.
fn print_status(status: &JobStatus, json: bool) {
    match json {
        true => say!("{}", status_json(status)),
        false => say!("{}", status_line(status)),
    }
}

/// An error of a call about one job: an unknown job (or another client's, or a refused
/// token) is a bad request.
fn job_call_error(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::NotFound | tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            anyhow::Error::new(crate::BadRequest(status.message().into()))
        }
        _ => anyhow::anyhow!("{}", status.message()),
    }
}

/// `shardpress jobs`: every job the coordinator knows, newest first.
pub async fn jobs(args: JobsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.coordinator, Duration::from_secs(3)).await?;
    let jobs = client
        .list_jobs(ListJobsRequest {})
        .await
        .map_err(job_call_error)?
        .into_inner()
        .jobs;
    if args.json {
        let jobs: Vec<serde_json::Value> = jobs.iter().map(status_json).collect();
        say!("{}", serde_json::Value::Array(jobs));
    } else if jobs.is_empty() {
        say!("no jobs");
    } else {
        for job in &jobs {
            say!("{}", status_line(job));
        }
    }
    Ok(())
}

/// `shardpress status JOB`.
pub async fn status(args: JobRefArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.coordinator, Duration::from_secs(3)).await?;
    let request = GetJobRequest { job_id: args.job };
    let status = client
        .get_job(request)
        .await
        .map_err(job_call_error)?
        .into_inner();
    print_status(&status, args.json);
    Ok(())
}

/// `shardpress watch JOB`: follows a job to its end as `compress` does (same summary and
/// exit codes).
pub async fn watch_job(args: JobRefArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.coordinator, Duration::from_secs(3)).await?;
    let request = GetJobRequest {
        job_id: args.job.clone(),
    };
    client.get_job(request).await.map_err(job_call_error)?;
    let status = watch(&mut client, &args.job).await?;
    let report = report(&mut client, &args.job).await;
    finish(&status, &report)
}

/// `shardpress cancel JOB`: a running job stops (no manifest); one already finalizing or
/// ended is left as it is. Prints the job's state after the request.
pub async fn cancel(args: JobRefArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.coordinator, Duration::from_secs(3)).await?;
    let request = CancelJobRequest { job_id: args.job };
    let status = client
        .cancel_job(request)
        .await
        .map_err(job_call_error)?
        .into_inner();
    print_status(&status, args.json);
    Ok(())
}

/// The report of a job that has ended, streamed in pieces (it grows with the model); empty,
/// with a warning, if it cannot be fetched (a finished job's is also in OUT/report.json).
pub async fn report(client: &mut JobClient, job_id: &str) -> String {
    let fetched = async {
        let request = GetJobRequest {
            job_id: job_id.to_string(),
        };
        let mut chunks = client.get_report(request).await?.into_inner();
        let mut report = Vec::new();
        while let Some(chunk) = chunks.next().await {
            report.extend_from_slice(&chunk?.data);
        }
        Ok::<_, tonic::Status>(report)
    };
    match fetched.await {
        Ok(report) => String::from_utf8_lossy(&report).into_owned(),
        Err(status) => {
            eprintln!(
                "warning: could not fetch the job's report: {}",
                status.message()
            );
            String::new()
        }
    }
}

/// Prints the outcome and the summary of `report`; an unsuccessful job is an error.
pub fn finish(status: &JobStatus, report: &str) -> anyhow::Result<()> {
    if !report.is_empty() {
        match serde_json::from_str::<serde_json::Value>(report) {
            Ok(report) => print_summary(&report),
            Err(e) => eprintln!("warning: unreadable report: {e}"),
        }
    }
    let state = status.state();
    let gate_failed = serde_json::from_str::<serde_json::Value>(report)
        .is_ok_and(|r| r["gates"]["passed"] == serde_json::Value::Bool(false));
    match state {
        JobState::Succeeded => {
            say!("{}", status.message);
            Ok(())
        }
        JobState::Failed if gate_failed => Err(anyhow::Error::new(crate::GateFailed(format!(
            "job {} failed its accuracy gates: {}",
            status.job_id, status.message
        )))),
        _ => bail!(
            "job {} {}: {}",
            status.job_id,
            state.label(),
            status.message
        ),
    }
}

/// `verify`: the manifest's signature (with `key`, a public key file), then every object's
/// checksum. A signature that does not check out fails, whatever the checksums say.
pub async fn verify(out: &str, key: Option<&std::path::Path>) -> anyhow::Result<()> {
    use shardpress_coordinator::finalize::MANIFEST_NAME;
    use shardpress_coordinator::signing::VerifyingKey;
    use shardpress_coordinator::verify::{verify_output, SignatureCheck};
    let key = key.map(VerifyingKey::load).transpose()?;
    let location = StoreLocation::open(out)?;
    let checked = verify_output(&location, key.as_ref()).await?;
    let (manifest, problems) = (&checked.manifest, &checked.problems);
    for problem in problems {
        eprintln!("MISMATCH {problem}");
    }
    let signed = match &checked.signature {
        SignatureCheck::Invalid(e) => {
            bail!(
                "the signature of {} does not check out: {e}",
                location.describe(MANIFEST_NAME)
            )
        }
        SignatureCheck::Valid(id) => format!(", signature by key {id} valid"),
        SignatureCheck::NotSigned => String::new(),
        SignatureCheck::Unchecked(id) => {
            let by = id
                .as_ref()
                .map(|id| format!(" by key {id}"))
                .unwrap_or_default();
            format!(", signed{by} (signature not checked: pass --key PUBFILE)")
        }
    };
    if problems.is_empty() {
        say!(
            "ok: {} objects match {} (job {}){signed}",
            manifest.objects.len(),
            location.describe(MANIFEST_NAME),
            manifest.job_id
        );
        return Ok(());
    }
    bail!(
        "{} of {} objects do not match the manifest",
        problems.len(),
        manifest.objects.len()
    )
}
