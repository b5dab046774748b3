//! The bridge from async code to the CPU-bound rayon pool: work is handed to rayon and its
//! result comes back over a oneshot channel, so heartbeats and gRPC stay responsive while the
//! passes run.

use std::panic::AssertUnwindSafe;

use shardpress_core::codec::CodecError;

use crate::TaskError;

/// Sizes the global rayon pool (0 = one thread per core). Safe to call more than once.
pub fn init_pool(threads: usize) -> Result<(), String> {
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("shardpress-cpu-{i}"))
        .build_global()
    {
        Ok(()) => Ok(()),
        // Already initialised (a second worker in the same process, or tests): keep it.
        Err(e) if rayon::current_num_threads() > 0 && e.to_string().contains("already") => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs `work` on the rayon pool and waits for it without blocking the runtime.
/// A panic inside `work` comes back as `Err` with its message.
pub async fn run<T, F>(work: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (sender, receiver) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        let result = std::panic::catch_unwind(AssertUnwindSafe(work)).map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into())
        });
        let _ = sender.send(result);
    });
    receiver
        .await
        .unwrap_or_else(|_| Err("compute pool dropped the work".into()))
}

/// Runs a tensor's codec `work` on the rayon pool (see [`run`]): a panic becomes
/// [`TaskError::Compute`] and a codec error [`TaskError::Pipeline`], both naming `tensor`.
pub async fn run_codec<T, F>(tensor: &str, work: F) -> Result<T, TaskError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, CodecError> + Send + 'static,
{
    run(work)
        .await
        .map_err(|message| TaskError::Compute {
            tensor: tensor.to_string(),
            message,
        })?
        .map_err(|source| TaskError::Pipeline {
            tensor: tensor.to_string(),
            source,
        })
}
