//! The assembly tasks of an `.spz` or GGUF job: stream the listed ranges of the parts (the
//! other tasks' outputs and the coordinator's head and tail; records of tensors identical to
//! an earlier one are left out) in order, in range-read pieces, into the output file: a
//! whole file as one multipart upload, or one slice of a file that several tasks write at
//! once (see `shardpress_store::shared`), hashed as a subtree of the file's BLAKE3 tree. The
//! coordinator never touches tensor bytes, and a file appears only once complete. Each
//! part's size is checked against what its task reported, so a stale or truncated part
//! cannot slip into the file.

use std::sync::atomic::Ordering;
use std::time::Instant;

use blake3::hazmat::{max_subtree_len, HasherExt};
use bytes::Bytes;
use shardpress_proto::v1::{AssembleSlice, CompleteTaskRequest, TaskLease};
use shardpress_store::shared::{SharedObject, SliceWriter};
use shardpress_store::StoreLocation;

use crate::task::{ShardWriter, TaskContext};
use crate::TaskError;

/// Bytes read from a part per range request.
const READ_PIECE: u64 = 16 * 1024 * 1024;

/// Concatenates the parts named in `spec` into `lease.output_name`.
pub async fn assemble(
    lease: &TaskLease,
    spec: &AssembleSlice,
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
    let mut sink = if spec.slices != 1 || spec.hash_only {
        Sink::Slice(slice_writer(lease, spec, &out)?)
    } else {
        let hasher = Some(blake3::Hasher::new());
        Sink::Whole(ShardWriter::staged(lease, &out, hasher).await?)
    };
    let (mut read_seconds, mut write_seconds) = (0f64, 0f64);
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
                sink.write(piece).await?;
                write_seconds += t.elapsed().as_secs_f64();
                at = end;
            }
        }
        Ok(())
    }
    .await;
    let t = Instant::now();
    let finished = match copied {
        Ok(()) => sink.finish().await,
        Err(e) => {
            sink.abort().await;
            Err(e)
        }
    };
    let (output_bytes, output_blake3, upload_part, upload_parts) = finished?;
    write_seconds += t.elapsed().as_secs_f64();
    Ok(CompleteTaskRequest {
        task: None,
        output_bytes,
        output_blake3,
        upload_part,
        upload_parts,
        tensors: Vec::new(),
        seconds: started.elapsed().as_secs_f64(),
        read_seconds,
        write_seconds,
        ..Default::default()
    })
}

/// Deletes the parts only this slice read, once the coordinator has accepted it (it never
/// runs again): they are in the file now. Best effort: finalizing deletes every part left.
pub async fn delete_consumed(lease: &TaskLease, spec: &AssembleSlice) {
    let Ok(out) = StoreLocation::open(&lease.out_url) else {
        return;
    };
    for part in spec
        .delete_after
        .iter()
        .filter_map(|&i| spec.parts.get(i as usize))
    {
        if let Err(e) = out.delete(part).await {
            tracing::warn!(part = %out.describe(part), error = %e, "could not delete a copied part");
        }
    }
}

/// Where the copied bytes go: the whole file, or this task's slice of a shared one.
enum Sink {
    Whole(ShardWriter),
    Slice(Slice),
}

/// One slice of a file several tasks write (or wrote in place: `writer` is None), hashed as
/// a subtree of the file's BLAKE3 tree, or as the whole file when it is the only slice.
struct Slice {
    writer: Option<SliceWriter>,
    hasher: blake3::Hasher,
    bytes: u64,
    whole_file: bool,
}

/// Checks that the slice is a whole BLAKE3 subtree where the lease puts it (a bad lease must
/// be an error, not a hashing assertion) and opens its writer.
fn slice_writer(
    lease: &TaskLease,
    spec: &AssembleSlice,
    out: &StoreLocation,
) -> Result<Slice, TaskError> {
    let len: u64 = spec.ranges.iter().map(|r| r.end - r.start).sum();
    let fits = max_subtree_len(spec.offset).is_none_or(|max| len <= max);
    if len == 0 || !spec.offset.is_multiple_of(blake3::CHUNK_LEN as u64) || !fits {
        return Err(TaskError::BadLease(format!(
            "assembly slice {} of {} ({len} bytes at {}) is not a whole hash subtree",
            spec.slice, spec.slices, spec.offset
        )));
    }
    let object = SharedObject {
        name: lease.output_name.clone(),
        staging: spec.staging.clone(),
        upload_id: spec.upload_id.clone(),
    };
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(spec.offset);
    let writer = match spec.hash_only {
        true => None,
        false => Some(out.slice_writer(&object, spec.slice as usize, spec.offset)?),
    };
    Ok(Slice {
        writer,
        hasher,
        bytes: 0,
        whole_file: spec.slices == 1,
    })
}

impl Sink {
    async fn write(&mut self, piece: Bytes) -> Result<(), TaskError> {
        match self {
            Sink::Whole(writer) => {
                writer.write(&piece);
                writer.flush().await?;
            }
            Sink::Slice(slice) => {
                slice.hasher.update(&piece);
                slice.bytes += piece.len() as u64;
                if let Some(writer) = &mut slice.writer {
                    writer.write(piece).await?;
                }
            }
        }
        Ok(())
    }

    /// Bytes written, their hash (a chaining value for a slice), the slice's upload part
    /// and a staged whole file's parts.
    async fn finish(self) -> Result<(u64, String, String, Vec<String>), TaskError> {
        match self {
            Sink::Whole(writer) => {
                let written = writer.finish().await?;
                Ok((
                    written.bytes,
                    written.blake3,
                    String::new(),
                    written.upload_parts,
                ))
            }
            Sink::Slice(slice) => {
                let hash = match slice.whole_file {
                    true => slice.hasher.finalize(),
                    false => blake3::Hash::from_bytes(slice.hasher.finalize_non_root()),
                };
                let part = match slice.writer {
                    Some(writer) => writer.finish().await?,
                    None => String::new(),
                };
                Ok((slice.bytes, hash.to_hex().to_string(), part, Vec::new()))
            }
        }
    }

    /// Drops what was written of a whole file; a slice's bytes are overwritten by its next
    /// attempt or dropped with the shared object.
    async fn abort(self) {
        if let Sink::Whole(writer) = self {
            writer.abort().await;
        }
    }
}
