//! `shardpress`: the command-line edge of the system. Each subcommand parses its arguments and
//! hands a plain config to the library crates; nothing here computes or serves by itself.

/// `println!` for the commands' output: a closed stdout (`shardpress inspect … | head`) ends
/// the process quietly, as Unix tools do, instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::write_stdout_line(format_args!($($arg)*))
    };
}

mod cli;
mod client;
mod decompress;
mod eval;
mod genmodel;
mod inspect;
mod local;
mod plan;
mod summary;

use clap::Parser;

use cli::{Cli, Command};

/// Writes one line to stdout; exits with success when the reader has gone (EPIPE: Rust
/// ignores SIGPIPE, so `println!` would panic), with failure on any other write error.
pub fn write_stdout_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"));
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
}

/// A request refused before any work: bad arguments, a recipe, model or output the job cannot
/// take. Exit code 3.
#[derive(Debug)]
pub struct BadRequest(pub String);

/// A job that ran and failed its accuracy gates (its report is written). Exit code 2.
#[derive(Debug)]
pub struct GateFailed(pub String);

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for GateFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadRequest {}
impl std::error::Error for GateFailed {}

/// The exit code of a failed command: 2 for a failed accuracy gate, 3 for a bad request, 1
/// for anything else (infrastructure: storage, network, a worker or coordinator lost).
fn exit_code(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<GateFailed>().is_some() {
        2
    } else if error.downcast_ref::<BadRequest>().is_some() {
        3
    } else {
        1
    }
}

/// Logs on stderr: the level from `SHARDPRESS_LOG`, else `RUST_LOG`, else `default`; colours
/// only on a terminal; one JSON object per line with `SHARDPRESS_LOG_FORMAT=json` (for log
/// collectors).
fn init_logging(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHARDPRESS_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("SHARDPRESS_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.use_stderr() {
                true => std::process::ExitCode::from(3),
                false => std::process::ExitCode::SUCCESS, // --help, --version
            };
        }
    };
    let quiet = matches!(
        cli.command,
        Command::Run(_)
            | Command::Demo(_)
            | Command::Compress(_)
            | Command::Jobs(_)
            | Command::Status(_)
            | Command::Watch(_)
            | Command::Cancel(_)
    );
    init_logging(if quiet { "warn" } else { "info" });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::dispatch(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(exit_code(&e))
        }
    }
}
