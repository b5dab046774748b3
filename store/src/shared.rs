//! One object written by several processes at once, each writing its own byte range (the
//! parallel assembly of an `.spz` archive or a GGUF file).
//!
//! On a local filesystem every writer opens one staging file and writes at its offset (the
//! writers share the filesystem, as they share the store); on S3 each writer uploads one part
//! of a multipart upload that the coordinator began. Nothing appears under the final name
//! until [`StoreLocation::complete_shared`] renames the staging file or completes the upload.
//! Other stores have no shared writes: there one process writes the whole object.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use object_store::multipart::{MultipartStore, PartId};
use object_store::{ObjectStoreExt, PutPayload};

use crate::{StoreError, StoreLocation};

/// How a store lets several processes write one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedWrites {
    /// A local filesystem: positioned writes into one staging file, then a rename.
    PositionedFile,
    /// S3: one part of a multipart upload per writer. Every part but the last must be at
    /// least [`MIN_PART_BYTES`].
    MultipartParts,
}

/// S3's smallest part (other than the last) of a multipart upload.
pub const MIN_PART_BYTES: u64 = 5 * 1024 * 1024;

/// An object being written in slices: what every writer needs to find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedObject {
    /// The object's final name.
    pub name: String,
    /// Local filesystem: the staging object the slices are written into.
    pub staging: String,
    /// S3: the multipart upload's id.
    pub upload_id: String,
}

/// Where a slice's bytes go.
enum Sink {
    File(Arc<std::fs::File>),
    Part(Vec<Bytes>),
}

/// Writes one slice of a [`SharedObject`], starting at its offset.
pub struct SliceWriter {
    location: StoreLocation,
    object: SharedObject,
    index: usize,
    at: u64,
    sink: Sink,
}

impl StoreLocation {
    /// Whether (and how) several processes can write one object here.
    pub fn shared_writes(&self) -> Option<SharedWrites> {
        if self.s3.is_some() {
            Some(SharedWrites::MultipartParts)
        } else if self.local_root().is_some() {
            Some(SharedWrites::PositionedFile)
        } else {
            None
        }
    }

    /// The filesystem path of the root of a `file://` location.
    pub fn local_root(&self) -> Option<std::path::PathBuf> {
        let url = url::Url::parse(&self.url).ok()?;
        (url.scheme() == "file").then(|| url.to_file_path().ok())?
    }

    fn local_file(&self, name: &str) -> Result<std::path::PathBuf, StoreError> {
        self.local_root()
            .map(|root| root.join(name))
            .ok_or_else(|| StoreError::Invalid {
                object: self.describe(name),
                reason: "not on a local filesystem".into(),
            })
    }

    fn multipart(&self, name: &str) -> Result<&Arc<dyn MultipartStore>, StoreError> {
        self.s3.as_ref().ok_or_else(|| StoreError::Invalid {
            object: self.describe(name),
            reason: "the store has no multipart uploads".into(),
        })
    }

    fn io_error(&self, name: &str, e: std::io::Error) -> StoreError {
        StoreError::Invalid {
            object: self.describe(name),
            reason: e.to_string(),
        }
    }

    /// Starts an object that several processes will write: an empty staging file (a stale
    /// one from an earlier attempt is replaced, unless `keep`: a resumed job's, holding what
    /// its finished tasks wrote) or a multipart upload.
    pub async fn begin_shared(
        &self,
        name: &str,
        staging: &str,
        keep: bool,
    ) -> Result<SharedObject, StoreError> {
        let mut object = SharedObject {
            name: name.to_string(),
            staging: String::new(),
            upload_id: String::new(),
        };
        match self.shared_writes() {
            Some(SharedWrites::PositionedFile) => {
                let path = self.local_file(staging)?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| self.io_error(staging, e))?;
                }
                // Resuming a job, the file keeps what its finished tasks wrote in place.
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(!keep)
                    .open(&path)
                    .map_err(|e| self.io_error(staging, e))?;
                object.staging = staging.to_string();
            }
            Some(SharedWrites::MultipartParts) => {
                object.upload_id = self
                    .multipart(name)?
                    .create_multipart(&self.path(name))
                    .await
                    .map_err(|e| self.map_err(name, e))?;
            }
            None => {
                return Err(StoreError::Invalid {
                    object: self.describe(name),
                    reason: "this store cannot be written by several processes at once".into(),
                })
            }
        }
        Ok(object)
    }

    /// A writer for slice `index` of `object`, which starts `offset` bytes into it.
    pub fn slice_writer(
        &self,
        object: &SharedObject,
        index: usize,
        offset: u64,
    ) -> Result<SliceWriter, StoreError> {
        let sink = if !object.upload_id.is_empty() {
            self.multipart(&object.name)?;
            Sink::Part(Vec::new())
        } else {
            // The staging file must exist: the coordinator created it, and a job given up
            // since has deleted it, which this writer must not undo.
            let path = self.local_file(&object.staging)?;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| self.io_error(&object.staging, e))?;
            Sink::File(Arc::new(file))
        };
        Ok(SliceWriter {
            location: self.clone(),
            object: object.clone(),
            index,
            at: offset,
            sink,
        })
    }

    /// Makes the object appear under its final name once every slice is written: checks the
    /// staging file's size and renames it, or completes the upload from the slices' part ids.
    pub async fn complete_shared(
        &self,
        object: &SharedObject,
        part_ids: Vec<String>,
        size: u64,
    ) -> Result<(), StoreError> {
        if object.upload_id.is_empty() {
            let written = self.size(&object.staging).await?;
            if written != size {
                return Err(StoreError::Invalid {
                    object: self.describe(&object.staging),
                    reason: format!("{written} bytes written, the assembly lays out {size}"),
                });
            }
            self.store
                .rename(&self.path(&object.staging), &self.path(&object.name))
                .await
                .map_err(|e| self.map_err(&object.staging, e))
        } else {
            let parts = part_ids
                .into_iter()
                .map(|content_id| PartId { content_id })
                .collect();
            self.multipart(&object.name)?
                .complete_multipart(&self.path(&object.name), &object.upload_id, parts)
                .await
                .map_err(|e| self.map_err(&object.name, e))?;
            let written = self.size(&object.name).await?;
            if written != size {
                return Err(StoreError::Invalid {
                    object: self.describe(&object.name),
                    reason: format!("{written} bytes uploaded, the assembly lays out {size}"),
                });
            }
            Ok(())
        }
    }

    /// Drops an unfinished shared object (best effort: the job is failing anyway).
    pub async fn abort_shared(&self, object: &SharedObject) {
        if object.upload_id.is_empty() {
            self.delete(&object.staging).await.ok();
        } else if let Ok(store) = self.multipart(&object.name) {
            let path = self.path(&object.name);
            store.abort_multipart(&path, &object.upload_id).await.ok();
        }
    }
}

impl SliceWriter {
    /// Appends `bytes` to the slice: written at once into the staging file, or kept for the
    /// part (a part is one request).
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), StoreError> {
        let len = bytes.len() as u64;
        match &mut self.sink {
            Sink::File(file) => {
                let (file, at) = (file.clone(), self.at);
                let written =
                    tokio::task::spawn_blocking(move || file.write_all_at(&bytes, at)).await;
                let written = written.unwrap_or_else(|e| Err(std::io::Error::other(e)));
                written.map_err(|e| self.location.io_error(&self.object.staging, e))?;
            }
            Sink::Part(pieces) => pieces.push(bytes),
        }
        self.at += len;
        Ok(())
    }

    /// Finishes the slice; returns the part id to complete the upload with (empty for a
    /// staging file).
    pub async fn finish(self) -> Result<String, StoreError> {
        match self.sink {
            Sink::File(_) => Ok(String::new()),
            Sink::Part(pieces) => {
                let name = &self.object.name;
                let part = self
                    .location
                    .multipart(name)?
                    .put_part(
                        &self.location.path(name),
                        &self.object.upload_id,
                        self.index,
                        PutPayload::from_iter(pieces),
                    )
                    .await
                    .map_err(|e| self.location.map_err(name, e))?;
                Ok(part.content_id)
            }
        }
    }
}
