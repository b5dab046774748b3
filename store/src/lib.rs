//! Storage addressing for shardpress: every model input and output goes through `object_store`,
//! addressed by URL (`file:///…`, plain paths, `s3://bucket/prefix`, `gs://bucket/prefix`,
//! `az://container/prefix`, `https://host/path` for reading, `memory:///`).
//!
//! A [`StoreLocation`] is a store plus a root prefix; objects are named relative to that root.
//! S3 settings come from the usual `AWS_*` environment variables (endpoint, region, credentials,
//! `AWS_ALLOW_HTTP`), read through object_store's own configuration keys, and from the AWS
//! profile files for what the environment leaves unset ([`profile`]).
//! [`read_source_file`] reads a safetensors header with two range reads, never the data;
//! [`spz::SpzReader`] reads an `.spz` archive by range; [`shared`] lets several processes write
//! one object; [`allow`] holds the `--allow` prefix lists.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutPayload};
use shardpress_core::header::{self, HeaderError};
use shardpress_core::plan::SourceFile;

pub mod allow;
mod model;
mod profile;
pub mod shared;
pub mod spz;
pub mod staged;
pub use model::{resolve_model, ModelFiles, INDEX_NAME};

/// `text` with the password of every URL in it hidden (`http://user:***@host`), so that
/// credentials written into a URL (`AWS_ENDPOINT=http://user:secret@minio:9000`) never reach
/// an error message, a log or a report.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let end = after
            .find(|c: char| c == '/' || c.is_whitespace() || "\"'()<>,;".contains(c))
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rfind('@') {
            Some(user_end) => {
                let user = &authority[..user_end];
                let name = user.split(':').next().unwrap_or_default();
                out.push_str(name);
                if user.contains(':') {
                    out.push_str(":***");
                }
                out.push_str(&authority[user_end..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// What can go wrong talking to storage; every variant names the object.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid storage URL {:?}: {}", redact(.url), redact(.reason))]
    InvalidUrl { url: String, reason: String },
    #[error("object not found: {object}")]
    NotFound { object: String },
    // The causes are part of the message, not also error sources, so that a chain printer
    // (anyhow's `{:#}`) does not print them twice.
    #[error("storage error on {}: {}", redact(.object), redact(&.cause.to_string()))]
    Io {
        object: String,
        cause: object_store::Error,
    },
    #[error("{object} is not a valid safetensors file: {cause}")]
    Header { object: String, cause: HeaderError },
    #[error("{}: {}", redact(.object), redact(.reason))]
    Invalid { object: String, reason: String },
    #[error("no credentials found for {}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials (AWS_PROFILE to choose one); the instance metadata service, asked last, did not give any ({})", redact(.object), redact(.cause))]
    NoCredentials { object: String, cause: String },
}

impl StoreError {
    /// Storage and network trouble may pass; a missing object, corrupt input, missing
    /// credentials or permissions, or an operation the store lacks will not.
    pub fn is_retryable(&self) -> bool {
        use object_store::Error as E;
        match self {
            StoreError::Io { cause, .. } => !matches!(
                cause,
                E::NotFound { .. }
                    | E::PermissionDenied { .. }
                    | E::Unauthenticated { .. }
                    | E::InvalidPath { .. }
                    | E::NotSupported { .. }
                    | E::NotImplemented { .. }
                    | E::UnknownConfigurationKey { .. }
            ),
            _ => false,
        }
    }
}

/// A store and a root prefix inside it, plus the URL it was opened from (for messages).
#[derive(Clone)]
pub struct StoreLocation {
    store: Arc<dyn ObjectStore>,
    /// The same store where it takes multipart uploads part by part (S3).
    s3: Option<Arc<dyn MultipartStore>>,
    root: Path,
    url: String,
}

impl std::fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreLocation")
            .field("url", &self.url)
            .finish()
    }
}

/// Object-store options from the environment: every `AWS_*` variable, lower-cased, which is how
/// object_store spells its configuration keys (`aws_endpoint`, `aws_allow_http`, …).
/// The store options of the `AWS_*`, `GOOGLE_*` and `AZURE_*` environment variables (named
/// as object_store's configuration keys), and for S3 those of the AWS profile files
/// ([`profile`]) that the environment leaves unset.
fn store_options(s3: bool) -> Result<Vec<(String, String)>, StoreError> {
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let mut options: Vec<(String, String)> = (env.iter())
        .filter(|(k, _)| {
            ["AWS_", "GOOGLE_", "AZURE_"]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    if s3 {
        options.extend(profile::profile_options(&env)?);
    }
    Ok(options)
}

/// A store, and the same store where it takes multipart uploads part by part (S3).
type OpenedStore = (Arc<dyn ObjectStore>, Option<Arc<dyn MultipartStore>>);

/// The stores this process has opened, by scheme and authority: one client (and connection
/// pool) per S3 bucket however many tasks a worker runs, and one `memory://` store that every
/// location of a process shares (an in-process cluster's).
fn opened_stores() -> &'static std::sync::Mutex<std::collections::HashMap<String, OpenedStore>> {
    static STORES: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, OpenedStore>>,
    > = std::sync::OnceLock::new();
    STORES.get_or_init(Default::default)
}

/// The key of `url`'s store in [`opened_stores`]: its scheme and authority.
fn store_key(url: &url::Url) -> String {
    format!("{}://{}", url.scheme(), url.authority())
}

/// Makes `store` the store of `url`'s scheme and authority (`s3://bucket`, `memory://`) for
/// the rest of this process, in place of one built from the environment: every location
/// under it, in the coordinator and the workers of this process, uses it. For programs that
/// embed shardpress with object stores of their own, and for tests (an in-memory store
/// standing in for a bucket). `multipart` is the same store where it takes multipart uploads
/// part by part (as S3 does); without it, outputs are staged and renamed.
pub fn register_store(
    url: &str,
    store: Arc<dyn ObjectStore>,
    multipart: Option<Arc<dyn MultipartStore>>,
) -> Result<(), StoreError> {
    let url = normalize_url(url)?;
    let mut stores = opened_stores().lock().map_err(|_| StoreError::InvalidUrl {
        url: url.to_string(),
        reason: "the store registry is unusable (a thread panicked holding it)".into(),
    })?;
    stores.insert(store_key(&url), (store, multipart));
    Ok(())
}

/// Builds the store of `url` with the environment's (and for S3 the profiles') settings.
fn build_store(url: &url::Url, is_s3: bool) -> Result<OpenedStore, StoreError> {
    let invalid = |e: object_store::Error| StoreError::InvalidUrl {
        url: url.to_string(),
        reason: e.to_string(),
    };
    let mut options = store_options(is_s3)?;
    if url.scheme() == "http" {
        // A plain http:// URL asks for HTTP (object_store refuses it by default).
        options.push(("allow_http".into(), "true".into()));
    }
    if !is_s3 {
        let (store, _) = object_store::parse_url_opts(url, options).map_err(invalid)?;
        return Ok((Arc::from(store), None));
    }
    // Built typed, for its multipart parts.
    let s3 = options
        .into_iter()
        .fold(
            AmazonS3Builder::new().with_url(url.to_string()),
            |builder, (key, value)| match key.parse() {
                Ok(key) => builder.with_config(key, value),
                Err(_) => builder,
            },
        )
        .build()
        .map_err(invalid)?;
    let s3 = Arc::new(s3);
    Ok((s3.clone(), Some(s3)))
}

/// Turns a plain filesystem path into a `file://` URL; leaves URLs alone.
pub fn normalize_url(url_or_path: &str) -> Result<url::Url, StoreError> {
    let invalid = |reason: String| StoreError::InvalidUrl {
        url: url_or_path.to_string(),
        reason,
    };
    if url_or_path.is_empty() {
        return Err(invalid("empty".into()));
    }
    if url_or_path.contains("://") || url_or_path.starts_with("memory:") {
        return url::Url::parse(url_or_path).map_err(|e| invalid(e.to_string()));
    }
    let absolute = std::path::absolute(url_or_path).map_err(|e| invalid(e.to_string()))?;
    url::Url::from_file_path(&absolute).map_err(|()| invalid("not an absolute path".into()))
}

impl StoreLocation {
    /// Opens the store addressed by `url_or_path`; the URL's path becomes the root prefix.
    /// Each store (a scheme and authority: `s3://bucket`, `https://host`, `memory://`) is
    /// built once per process ([`opened_stores`]) and shared by every location in it.
    pub fn open(url_or_path: &str) -> Result<Self, StoreError> {
        let url = normalize_url(url_or_path)?;
        let (scheme, root) =
            ObjectStoreScheme::parse(&url).map_err(|e| StoreError::InvalidUrl {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
        let key = store_key(&url);
        let known = opened_stores()
            .lock()
            .ok()
            .and_then(|s| s.get(&key).cloned());
        let (store, s3) = match known {
            Some(opened) => opened,
            None => {
                let opened = build_store(&url, scheme == ObjectStoreScheme::AmazonS3)?;
                if let Ok(mut stores) = opened_stores().lock() {
                    stores.insert(key, opened.clone());
                }
                opened
            }
        };
        let mut location = Self::from_parts(store, root, url.to_string());
        location.s3 = s3;
        Ok(location)
    }

    /// Wraps an existing store (tests use `InMemory`).
    pub fn from_parts(store: Arc<dyn ObjectStore>, root: Path, url: String) -> Self {
        let url = url.trim_end_matches('/').to_string();
        Self {
            store,
            s3: None,
            root,
            url,
        }
    }

    /// Where this location really is, for telling whether two locations are the same place:
    /// on a local filesystem the canonical path (symlinks resolved, percent-encoding decoded;
    /// for a folder that does not exist yet, its nearest existing ancestor's, plus the rest),
    /// elsewhere the store's URL with its normalized path.
    pub fn identity(&self) -> String {
        let Some(path) = self.local_root() else {
            let base = self.url.split('/').take(3).collect::<Vec<_>>().join("/");
            return format!("{base}/{}", self.root.as_ref());
        };
        let mut missing = Vec::new();
        let mut existing = path.as_path();
        let canonical = loop {
            if let Ok(canonical) = std::fs::canonicalize(existing) {
                break canonical;
            }
            match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    missing.push(name.to_owned());
                    existing = parent;
                }
                _ => break existing.to_path_buf(),
            }
        };
        let full = missing.iter().rev().fold(canonical, |p, name| p.join(name));
        format!("file://{}", full.display())
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The location of `name` (which may contain `/`) under the root.
    pub fn path(&self, name: &str) -> Path {
        name.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.root.clone(), |path, part| path.clone().join(part))
    }

    /// A location for a sub-directory of this one.
    pub fn child_location(&self, name: &str) -> StoreLocation {
        Self {
            store: self.store.clone(),
            s3: self.s3.clone(),
            root: self.path(name),
            url: format!("{}/{}", self.url, name),
        }
    }

    /// The display name of an object, for messages.
    pub fn describe(&self, name: &str) -> String {
        if name.is_empty() {
            redact(&self.url)
        } else {
            redact(&format!("{}/{}", self.url, name))
        }
    }

    fn map_err(&self, name: &str, source: object_store::Error) -> StoreError {
        // With no credentials configured, S3 requests ask the instance metadata service
        // last; off EC2 it does not answer.
        let text = source.to_string();
        if text.contains("/latest/api/token") || text.contains("/latest/meta-data/iam") {
            return StoreError::NoCredentials {
                object: self.describe(name),
                cause: text,
            };
        }
        match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound {
                object: self.describe(name),
            },
            cause => StoreError::Io {
                object: self.describe(name),
                cause,
            },
        }
    }

    pub async fn size(&self, name: &str) -> Result<u64, StoreError> {
        let meta = self
            .store
            .head(&self.path(name))
            .await
            .map_err(|e| self.map_err(name, e))?;
        Ok(meta.size)
    }

    pub async fn exists(&self, name: &str) -> Result<bool, StoreError> {
        match self.size(name).await {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let bytes = self
            .store
            .get_range(&self.path(name), range.clone())
            .await
            .map_err(|e| self.map_err(name, e))?;
        if bytes.len() as u64 != range.end - range.start {
            return Err(StoreError::Invalid {
                object: self.describe(name),
                reason: format!(
                    "short read: asked for bytes {}..{}, got {}",
                    range.start,
                    range.end,
                    bytes.len()
                ),
            });
        }
        Ok(bytes)
    }

    pub async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
        let result = self
            .store
            .get(&self.path(name))
            .await
            .map_err(|e| self.map_err(name, e))?;
        result.bytes().await.map_err(|e| self.map_err(name, e))
    }

    /// Atomic put: readers see the whole object or nothing.
    pub async fn put(&self, name: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.store
            .put(&self.path(name), PutPayload::from(bytes))
            .await
            .map_err(|e| self.map_err(name, e))?;
        Ok(())
    }

    pub async fn delete(&self, name: &str) -> Result<(), StoreError> {
        match self.store.delete(&self.path(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.map_err(name, e)),
        }
    }

    /// On a local filesystem store, removes the directory `name` under the root if it is
    /// empty: deleting its objects leaves it behind there, while object stores have no
    /// directories (nothing to do). Best effort: a directory still in use stays.
    pub fn remove_empty_dir(&self, name: &str) {
        let Ok(url) = url::Url::parse(&self.url) else {
            return;
        };
        if url.scheme() == "file" {
            if let Ok(root) = url.to_file_path() {
                let _ = std::fs::remove_dir(root.join(name));
            }
        }
    }

    /// Deletes the folder `name` and everything in it on a local filesystem (best effort;
    /// nothing to do elsewhere: object stores have no folders).
    pub fn remove_local_tree(&self, name: &str) {
        if let Some(root) = self.local_root() {
            let _ = std::fs::remove_dir_all(root.join(name));
        }
    }

    /// Objects directly under the root (no recursion): (name, size), sorted by name.
    pub async fn list_top_level(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.root))
            .await
            .map_err(|e| self.map_err("", e))?;
        let mut out: Vec<(String, u64)> = listing
            .objects
            .into_iter()
            .filter_map(|meta| {
                let name = meta.location.filename()?.to_string();
                Some((name, meta.size))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Every object under the root, at any depth: names relative to the root, sorted.
    pub async fn list_all(&self) -> Result<Vec<String>, StoreError> {
        let listed: Vec<_> = self
            .store
            .list(Some(&self.root))
            .try_collect()
            .await
            .map_err(|e| self.map_err("", e))?;
        let mut names: Vec<String> = listed
            .iter()
            .filter_map(|meta| {
                let parts = meta.location.prefix_match(&self.root)?;
                let parts: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
                Some(parts.join("/"))
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Hashes an object with blake3 while streaming it (never whole in memory).
    pub async fn blake3(&self, name: &str) -> Result<(String, u64), StoreError> {
        let result = self
            .store
            .get(&self.path(name))
            .await
            .map_err(|e| self.map_err(name, e))?;
        let mut stream = result.into_stream();
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.try_next().await.map_err(|e| self.map_err(name, e))? {
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok((hasher.finalize().to_hex().to_string(), size))
    }
}

/// Reads and validates a safetensors header with two range reads (length prefix, then JSON).
pub async fn read_source_file(
    location: &StoreLocation,
    name: &str,
) -> Result<SourceFile, StoreError> {
    let header_err = |cause| StoreError::Header {
        object: location.describe(name),
        cause,
    };
    let size = location.size(name).await?;
    let prefix_len = size.min(8);
    let prefix = location.get_range(name, 0..prefix_len).await?;
    let header_len = header::header_len_from_prefix(&prefix, size).map_err(header_err)?;
    let json = location.get_range(name, 8..8 + header_len).await?;
    let header = header::parse_header(&json, size).map_err(header_err)?;
    Ok(SourceFile {
        name: name.to_string(),
        size,
        header,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_never_reach_a_message() {
        assert_eq!(
            redact("GET http://user:s3cret@minio:9000/bucket/x failed"),
            "GET http://user:***@minio:9000/bucket/x failed"
        );
        assert_eq!(redact("s3://bucket/a:b@c"), "s3://bucket/a:b@c");
        assert_eq!(redact("https://token@host/x"), "https://token@host/x");
        assert_eq!(redact("no url here: a@b"), "no url here: a@b");
        let error = StoreError::Invalid {
            object: "http://me:hunter2@host/model".into(),
            reason: "see http://me:hunter2@host".into(),
        };
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let location = StoreLocation::open("http://me:hunter2@host/model").unwrap();
        assert!(!location.describe("config.json").contains("hunter2"));
    }

    fn io(cause: object_store::Error) -> StoreError {
        StoreError::Io {
            object: "s3://bucket/model.safetensors".into(),
            cause,
        }
    }

    #[test]
    fn only_trouble_that_may_pass_is_retried() {
        let source = || "status 403".into();
        let path = || "model.safetensors".to_string();
        let denied = object_store::Error::PermissionDenied {
            path: path(),
            source: source(),
        };
        let unauthenticated = object_store::Error::Unauthenticated {
            path: path(),
            source: source(),
        };
        assert!(!io(denied).is_retryable());
        assert!(!io(unauthenticated).is_retryable());
        let network = object_store::Error::Generic {
            store: "S3",
            source: "connection reset".into(),
        };
        assert!(io(network).is_retryable());
        assert!(!StoreError::NotFound { object: path() }.is_retryable());
    }

    #[test]
    fn google_azure_and_http_urls_open_as_their_stores() {
        // Opening configures a store; nothing is contacted until an object is asked for.
        for url in [
            "gs://bucket/models/llama",
            "https://models.example.com/llama",
            "http://127.0.0.1:9/llama",
        ] {
            let location = StoreLocation::open(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(location.url(), url);
        }
        // Azure needs its account, which an error names.
        match StoreLocation::open("az://container/models") {
            Ok(location) => assert_eq!(location.url(), "az://container/models"),
            Err(e) => assert!(e.to_string().to_lowercase().contains("account"), "{e}"),
        }
    }

    #[tokio::test]
    async fn a_store_is_built_once_per_process_and_shared_by_its_locations() {
        let a = StoreLocation::open("s3://shared-bucket/models/a").unwrap();
        let b = StoreLocation::open("s3://shared-bucket/models/b").unwrap();
        let other = StoreLocation::open("s3://other-bucket/models/a").unwrap();
        assert!(Arc::ptr_eq(a.store(), b.store()));
        assert!(!Arc::ptr_eq(a.store(), other.store()));
        // memory:// is one store per process: what one location writes, another reads.
        let writer = StoreLocation::open("memory:///cluster/out").unwrap();
        writer
            .put("x.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let reader = StoreLocation::open("memory:///cluster").unwrap();
        assert_eq!(&reader.get("out/x.json").await.unwrap()[..], b"{}");
    }
}
