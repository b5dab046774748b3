//! Where a task's (or an assembly's) output goes: the attempt's staged object (see
//! `shardpress_store::staged`), or its place in a GGUF file several tasks write at once,
//! hashed on the way when asked.

use bytes::Bytes;
use shardpress_proto::v1::{PositionedOutput, TaskLease};
use shardpress_store::shared::{SharedObject, SliceWriter};
use shardpress_store::staged::{StagedOutput, StagedWriter};
use shardpress_store::StoreLocation;

use crate::TaskError;

/// Where a task's (or an assembly's) output goes, hashed on the way when asked.
pub(crate) struct ShardWriter {
    sink: Sink,
    /// None where nothing needs the output's hash.
    hasher: Option<blake3::Hasher>,
    pub(crate) bytes: u64,
    /// The output, for messages.
    object: String,
}

enum Sink {
    /// An object of its own, written where the lease's attempt was told to (see
    /// `shardpress_store::staged`): the coordinator commits it under its final name.
    Staged(StagedWriter),
    /// A GGUF task's place in its file (several tasks write it at once): bytes are buffered
    /// until flushed, and never written past the `size` the layout gives.
    InPlace {
        writer: SliceWriter,
        pending: Vec<u8>,
        written: u64,
        size: u64,
    },
}

/// What a finished output is: its size, its hash (empty when not hashed) and, for a staged
/// S3 upload, the ids of its parts.
pub(crate) struct Written {
    pub(crate) bytes: u64,
    pub(crate) blake3: String,
    pub(crate) upload_parts: Vec<String>,
}

impl ShardWriter {
    /// The writer of a lease's output: in place when the lease says where, else where the
    /// lease stages it.
    pub(crate) async fn open(
        lease: &TaskLease,
        write_at: Option<&PositionedOutput>,
        out: &StoreLocation,
        hashed: bool,
    ) -> Result<Self, TaskError> {
        let hasher = hashed.then(blake3::Hasher::new);
        let Some(at) = write_at else {
            return Self::staged(lease, out, hasher).await;
        };
        let object = SharedObject {
            name: lease.output_name.clone(),
            staging: at.staging.clone(),
            upload_id: String::new(),
        };
        Ok(Self {
            sink: Sink::InPlace {
                writer: out.slice_writer(&object, 0, at.offset)?,
                pending: Vec::new(),
                written: 0,
                size: at.size,
            },
            hasher,
            bytes: 0,
            object: out.describe(&at.staging),
        })
    }

    /// The lease's staged output (a lease without one is refused: this worker never writes
    /// a final name).
    pub(crate) async fn staged(
        lease: &TaskLease,
        out: &StoreLocation,
        hasher: Option<blake3::Hasher>,
    ) -> Result<Self, TaskError> {
        let Some(staged) = &lease.staged else {
            return Err(TaskError::BadLease(format!(
                "the lease of {} says neither where to stage its output nor where to write it in place",
                lease.output_name
            )));
        };
        let staged = StagedOutput {
            name: lease.output_name.clone(),
            staging: staged.staging.clone(),
            upload_id: staged.upload_id.clone(),
        };
        Ok(Self {
            sink: Sink::Staged(out.staged_writer(&staged).await?),
            hasher,
            bytes: 0,
            object: out.describe(&lease.output_name),
        })
    }

    pub(crate) fn write(&mut self, data: &[u8]) {
        if let Some(hasher) = &mut self.hasher {
            hasher.update(data);
        }
        self.bytes += data.len() as u64;
        match &mut self.sink {
            Sink::Staged(writer) => writer.write(data),
            Sink::InPlace { pending, .. } => pending.extend_from_slice(data),
        }
    }

    /// Waits for upload capacity, or writes what is buffered in place.
    pub(crate) async fn flush(&mut self) -> Result<(), TaskError> {
        match &mut self.sink {
            Sink::Staged(writer) => Ok(writer.flush().await?),
            Sink::InPlace {
                writer,
                pending,
                written,
                size,
            } => {
                let end = *written + pending.len() as u64;
                if end > *size {
                    return Err(TaskError::BadTensor {
                        tensor: self.object.clone(),
                        reason: format!(
                            "the task's output reached {end} bytes, the GGUF layout gives it {size}"
                        ),
                    });
                }
                writer.write(Bytes::from(std::mem::take(pending))).await?;
                *written = end;
                Ok(())
            }
        }
    }

    /// Completes the output (staged: for the coordinator to commit).
    pub(crate) async fn finish(mut self) -> Result<Written, TaskError> {
        self.flush().await?;
        let blake3 = self
            .hasher
            .take()
            .map_or_else(String::new, |h| h.finalize().to_hex().to_string());
        let upload_parts = match self.sink {
            Sink::Staged(writer) => writer.finish().await?,
            Sink::InPlace {
                writer,
                written,
                size,
                ..
            } => {
                if written != size {
                    return Err(TaskError::BadTensor {
                        tensor: self.object,
                        reason: format!(
                            "the task wrote {written} bytes, the GGUF layout gives it {size}"
                        ),
                    });
                }
                writer.finish().await?;
                Vec::new()
            }
        };
        Ok(Written {
            bytes: self.bytes,
            blake3,
            upload_parts,
        })
    }

    /// Drops a staged output; bytes written in place are overwritten by the next attempt.
    pub(crate) async fn abort(self) {
        if let Sink::Staged(writer) = self.sink {
            writer.abort().await;
        }
    }
}
