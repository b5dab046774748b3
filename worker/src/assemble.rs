//! The last task of an `.spz` job: stream the archive's prefix, the listed ranges of the parts
//! the other tasks wrote (in order, in range-read pieces; records of tensors identical to an
//! earlier one are left out), and the coordinator's suffix (companion files, index, footer)
//! into one multipart upload. The coordinator never touches tensor bytes, and
//! the archive appears only once complete. Each part's size is checked against what its task
//! reported, so a stale or truncated part cannot slip into the archive.

use std::sync::atomic::Ordering;
use std::time::Instant;

use object_store::{ObjectStoreExt, WriteMultipart};
use shardpress_proto::v1::{AssembleSpz, CompleteTaskRequest, TaskLease};
use shardpress_store::StoreLocation;

use crate::task::{ShardWriter, TaskContext};
use crate::TaskError;

/// Bytes read from a part per range request.
const READ_PIECE: u64 = 16 * 1024 * 1024;
/// Multipart part size and upload concurrency.
const PART_BYTES: usize = 8 * 1024 * 1024;
const UPLOAD_CONCURRENCY: usize = 4;

/// Concatenates the parts named in `spec` into `lease.output_name`.
pub async fn assemble(
    lease: &TaskLease,
    spec: &AssembleSpz,
    ctx: &TaskContext,
) -> Result<CompleteTaskRequest, TaskError> {
    let started = Instant::now();
    if spec.parts.len() != spec.part_sizes.len() {
        return Err(TaskError::BadLease(format!(
            "assemble lists {} parts but {} sizes",
            spec.parts.len(),
            spec.part_sizes.len()
        )));
    }
    let out = StoreLocation::open(&lease.out_url)?;
    if let Some(bad) = spec.ranges.iter().find(|r| {
        spec.part_sizes
            .get(r.part as usize)
            .is_none_or(|&size| r.start > r.end || r.end > size)
    }) {
        return Err(TaskError::BadLease(format!(
            "assemble range {}..{} of part {} lies outside the {} parts' sizes",
            bad.start,
            bad.end,
            bad.part,
            spec.parts.len()
        )));
    }
    for (part, &expected) in spec.parts.iter().zip(&spec.part_sizes) {
        let size = out.size(part).await?;
        if size != expected {
            return Err(TaskError::BadTensor {
                tensor: out.describe(part),
                reason: format!("part is {size} bytes, its task reported {expected}"),
            });
        }
    }
    let object = out.describe(&lease.output_name);
    let upload_err = |e: object_store::Error| TaskError::Upload {
        object: object.clone(),
        message: e.to_string(),
    };
    let upload = out
        .store()
        .put_multipart(&out.path(&lease.output_name))
        .await
        .map_err(upload_err)?;
    let mut writer = ShardWriter {
        inner: WriteMultipart::new_with_chunk_size(upload, PART_BYTES),
        hasher: blake3::Hasher::new(),
        bytes: 0,
    };
    let (mut read_seconds, mut write_seconds) = (0f64, 0f64);
    writer.write(&spec.prefix);
    let copied = async {
        for range in &spec.ranges {
            let part = &spec.parts[range.part as usize];
            let mut at = range.start;
            while at < range.end {
                if ctx.cancelled.load(Ordering::Relaxed) {
                    return Err(TaskError::Cancelled("lease lost".into()));
                }
                let end = (at + READ_PIECE).min(range.end);
                let t = Instant::now();
                let piece = out.get_range(part, at..end).await?;
                read_seconds += t.elapsed().as_secs_f64();
                let t = Instant::now();
                writer.write(&piece);
                writer
                    .inner
                    .wait_for_capacity(UPLOAD_CONCURRENCY)
                    .await
                    .map_err(upload_err)?;
                write_seconds += t.elapsed().as_secs_f64();
                at = end;
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = copied {
        writer.inner.abort().await.ok();
        return Err(e);
    }
    writer.write(&spec.suffix);
    let t = Instant::now();
    let output_bytes = writer.bytes;
    let output_blake3 = writer.hasher.finalize().to_hex().to_string();
    writer.inner.finish().await.map_err(upload_err)?;
    write_seconds += t.elapsed().as_secs_f64();
    Ok(CompleteTaskRequest {
        task: None,
        output_bytes,
        output_blake3,
        tensors: Vec::new(),
        seconds: started.elapsed().as_secs_f64(),
        read_seconds,
        write_seconds,
        ..Default::default()
    })
}
