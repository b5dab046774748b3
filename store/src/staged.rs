//! A task's output, written by a worker where its attempt was told to and committed under
//! its final name by the coordinator alone (write fencing).
//!
//! A worker never writes a final name. Where the store renames (a local filesystem, GCS,
//! Azure) the attempt writes a staging object of its own, which the coordinator renames when
//! it accepts the attempt's result. On S3 the coordinator begins a multipart upload of the
//! final name for the attempt; the worker uploads parts, and only the coordinator completes
//! the upload (or aborts it when the attempt is given up). An orphaned or stale worker can
//! therefore never replace a committed object, and a killed worker leaves nothing under a
//! final name.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::task::JoinSet;

use crate::{StoreError, StoreLocation};

/// Bytes per part of an upload: above S3's 5 MiB smallest part.
pub const PART_BYTES: usize = 8 * 1024 * 1024;

/// Parts uploaded at once by one writer.
const PARTS_IN_FLIGHT: usize = 4;

/// Where one attempt writes the object `name`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StagedOutput {
    /// The object's final name.
    pub name: String,
    /// The attempt's staging object (where there is no upload).
    pub staging: String,
    /// S3: the multipart upload of `name` begun for the attempt.
    pub upload_id: String,
}

/// Writes a [`StagedOutput`]: streamed, a part at a time.
pub struct StagedWriter {
    sink: Sink,
    object: String,
}

enum Sink {
    /// The staging object, uploaded as object_store does any large object.
    Staging(WriteMultipart),
    /// Parts of the coordinator's multipart upload.
    Parts(PartUploader),
}

struct PartUploader {
    store: Arc<dyn MultipartStore>,
    path: Path,
    upload_id: String,
    pending: BytesMut,
    next_part: usize,
    in_flight: JoinSet<Result<(usize, PartId), object_store::Error>>,
    uploaded: Vec<(usize, String)>,
}

impl StoreLocation {
    /// Prepares where an attempt's writes of `name` go: on S3 a new multipart upload of
    /// `name`, elsewhere the staging object `staging` (created when the worker writes).
    pub async fn begin_staged(
        &self,
        name: &str,
        staging: &str,
    ) -> Result<StagedOutput, StoreError> {
        let mut staged = StagedOutput {
            name: name.to_string(),
            staging: staging.to_string(),
            upload_id: String::new(),
        };
        if let Some(s3) = &self.s3 {
            staged.upload_id = s3
                .create_multipart(&self.path(name))
                .await
                .map_err(|e| self.map_err(name, e))?;
        }
        Ok(staged)
    }

    /// A writer of `staged`'s bytes.
    pub async fn staged_writer(&self, staged: &StagedOutput) -> Result<StagedWriter, StoreError> {
        let sink = if staged.upload_id.is_empty() {
            let upload = self
                .store
                .put_multipart(&self.path(&staged.staging))
                .await
                .map_err(|e| self.map_err(&staged.staging, e))?;
            Sink::Staging(WriteMultipart::new_with_chunk_size(upload, PART_BYTES))
        } else {
            let store = self.s3.clone().ok_or_else(|| StoreError::Invalid {
                object: self.describe(&staged.name),
                reason: "an upload id was given, but the store has no multipart uploads".into(),
            })?;
            Sink::Parts(PartUploader {
                store,
                path: self.path(&staged.name),
                upload_id: staged.upload_id.clone(),
                pending: BytesMut::new(),
                next_part: 0,
                in_flight: JoinSet::new(),
                uploaded: Vec::new(),
            })
        };
        let object = match staged.upload_id.is_empty() {
            true => self.describe(&staged.staging),
            false => self.describe(&staged.name),
        };
        Ok(StagedWriter { sink, object })
    }

    /// Makes an accepted attempt's output appear under its final name, after checking that
    /// it is `size` bytes: renames the staging object, or completes the upload from `parts`.
    pub async fn commit_staged(
        &self,
        staged: &StagedOutput,
        parts: &[String],
        size: u64,
    ) -> Result<(), StoreError> {
        let name = &staged.name;
        if staged.upload_id.is_empty() {
            let written = self.size(&staged.staging).await?;
            if written != size {
                return Err(StoreError::Invalid {
                    object: self.describe(&staged.staging),
                    reason: format!("{written} bytes written, the task reported {size}"),
                });
            }
            return self
                .store
                .rename(&self.path(&staged.staging), &self.path(name))
                .await
                .map_err(|e| self.map_err(&staged.staging, e));
        }
        let s3 = self.s3.as_ref().ok_or_else(|| StoreError::Invalid {
            object: self.describe(name),
            reason: "the store has no multipart uploads".into(),
        })?;
        let parts = (parts.iter())
            .map(|content_id| PartId {
                content_id: content_id.clone(),
            })
            .collect();
        let path = self.path(name);
        s3.complete_multipart(&path, &staged.upload_id, parts)
            .await
            .map_err(|e| self.map_err(name, e))?;
        let written = self.size(name).await?;
        if written != size {
            // Not this attempt's to keep: the task runs again and replaces it.
            self.delete(name).await.ok();
            return Err(StoreError::Invalid {
                object: self.describe(name),
                reason: format!("{written} bytes uploaded, the task reported {size}"),
            });
        }
        Ok(())
    }

    /// Drops what an attempt that will not be committed wrote (best effort): deletes its
    /// staging object or aborts its upload, after which no part can be added to it.
    pub async fn discard_staged(&self, staged: &StagedOutput) {
        if !staged.upload_id.is_empty() {
            if let Some(s3) = &self.s3 {
                let path = self.path(&staged.name);
                if let Err(e) = s3.abort_multipart(&path, &staged.upload_id).await {
                    tracing::debug!(object = %self.describe(&staged.name), "abort: {e}");
                }
            }
        } else {
            self.delete(&staged.staging).await.ok();
        }
    }
}

impl StagedWriter {
    /// Appends `data`; uploads whole parts in the background.
    pub fn write(&mut self, data: &[u8]) {
        match &mut self.sink {
            Sink::Staging(upload) => upload.write(data),
            Sink::Parts(parts) => {
                parts.pending.extend_from_slice(data);
                while parts.pending.len() >= PART_BYTES {
                    let part = parts.pending.split_to(PART_BYTES).freeze();
                    parts.spawn(part);
                }
            }
        }
    }

    /// Waits until fewer than a few parts are in flight, so that memory stays bounded.
    pub async fn flush(&mut self) -> Result<(), StoreError> {
        let object = self.object.clone();
        let failed = |e: object_store::Error| upload_error(&object, e);
        match &mut self.sink {
            Sink::Staging(upload) => upload
                .wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(failed),
            Sink::Parts(parts) => {
                while parts.in_flight.len() >= PARTS_IN_FLIGHT {
                    parts.join_one().await.map_err(failed)?;
                }
                Ok(())
            }
        }
    }

    /// Uploads what is left; returns the ids of the parts to complete the upload with (none
    /// for a staging object, which is whole now).
    pub async fn finish(self) -> Result<Vec<String>, StoreError> {
        let object = self.object;
        let failed = |e: object_store::Error| upload_error(&object, e);
        match self.sink {
            Sink::Staging(upload) => {
                upload.finish().await.map_err(failed)?;
                Ok(Vec::new())
            }
            Sink::Parts(mut parts) => {
                // An upload has one part at least, even of an empty object.
                if !parts.pending.is_empty() || parts.next_part == 0 {
                    let last = std::mem::take(&mut parts.pending).freeze();
                    parts.spawn(last);
                }
                while !parts.in_flight.is_empty() {
                    parts.join_one().await.map_err(failed)?;
                }
                parts.uploaded.sort_by_key(|(index, _)| *index);
                Ok(parts.uploaded.into_iter().map(|(_, id)| id).collect())
            }
        }
    }

    /// Stops writing: drops the staging object's upload. A multipart upload stays for the
    /// coordinator to abort (it began it, and knows when the attempt is given up).
    pub async fn abort(self) {
        match self.sink {
            Sink::Staging(upload) => {
                upload.abort().await.ok();
            }
            Sink::Parts(mut parts) => parts.in_flight.abort_all(),
        }
    }
}

impl PartUploader {
    fn spawn(&mut self, bytes: Bytes) {
        let (store, path, upload_id) = (
            self.store.clone(),
            self.path.clone(),
            self.upload_id.clone(),
        );
        let index = self.next_part;
        self.next_part += 1;
        self.in_flight.spawn(async move {
            let part = store
                .put_part(&path, &upload_id, index, PutPayload::from(bytes))
                .await?;
            Ok((index, part))
        });
    }

    async fn join_one(&mut self) -> Result<(), object_store::Error> {
        match self.in_flight.join_next().await {
            Some(Ok(Ok((index, part)))) => {
                self.uploaded.push((index, part.content_id));
                Ok(())
            }
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            }),
            None => Ok(()),
        }
    }
}

fn upload_error(object: &str, cause: object_store::Error) -> StoreError {
    StoreError::Io {
        object: object.to_string(),
        cause,
    }
}
