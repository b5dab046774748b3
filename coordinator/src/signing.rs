//! Signed manifests: Ed25519 keys in small text files, the signature of `manifest.json` and
//! its check.
//!
//! A coordinator given a secret key signs the exact bytes of each job's `manifest.json` and
//! writes the signature beside it as `manifest.json.sig`, before the manifest itself (which
//! stays the commit point). Whoever holds the public key can then tell that the manifest,
//! and through its checksums every object, is what that coordinator wrote.
//!
//! Files, one line each (blank lines and `#` comments are skipped), hex of 32 or 64 bytes:
//! - secret key: `shardpress-ed25519-secret HEX` (created with mode 0600);
//! - public key: `shardpress-ed25519-public HEX`;
//! - signature: `shardpress-ed25519-signature KEY_ID HEX`.
//!
//! The tag names the kind, so a public key given where the secret one is needed (or a
//! signature given as a key) is refused by name. A key id is the first 16 hex digits of the
//! BLAKE3 hash of the public key: short enough to read, enough to tell keys apart.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Object name of a manifest's signature, beside `manifest.json`.
pub const SIGNATURE_NAME: &str = "manifest.json.sig";

const SECRET_TAG: &str = "shardpress-ed25519-secret";
const PUBLIC_TAG: &str = "shardpress-ed25519-public";
const SIGNATURE_TAG: &str = "shardpress-ed25519-signature";

/// What can go wrong reading, writing or checking keys and signatures. Each variant names
/// the file (or object) concerned.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; pass --force to replace it")]
    Exists { path: PathBuf },
    #[error("{origin} holds a {found}, but a {expected} is needed here")]
    WrongKind {
        origin: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("{origin} is not a {expected} file: expected one line `{tag} HEX`")]
    NotAKeyFile {
        origin: String,
        expected: &'static str,
        tag: &'static str,
    },
    #[error("{origin}: the {what} is not hexadecimal ({reason})")]
    BadHex {
        origin: String,
        what: &'static str,
        reason: String,
    },
    #[error("{origin}: the {what} has {found} bytes, an Ed25519 {what} has {expected}")]
    WrongLength {
        origin: String,
        what: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("{origin}: not a valid Ed25519 public key (not a point of the curve)")]
    InvalidPublicKey { origin: String },
    #[error(
        "{origin} is not a shardpress signature: expected one line `{SIGNATURE_TAG} KEY_ID HEX`"
    )]
    NotASignature { origin: String },
    #[error("{object} is missing: the manifest is not signed, so it cannot be checked against key {key_id}")]
    MissingSignature { object: String, key_id: KeyId },
    #[error("{object} was made by key {found}, not by the given key {expected}")]
    WrongKey {
        object: String,
        found: KeyId,
        expected: KeyId,
    },
    #[error("{object} does not match the manifest's bytes for key {key_id}: the manifest was changed after it was signed, or the signature is damaged")]
    BadSignature { object: String, key_id: KeyId },
}

/// The short id of a public key: the first 16 hex digits of its BLAKE3 hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyId(String);

impl KeyId {
    fn of(public: &ed25519_dalek::VerifyingKey) -> Self {
        let hash = blake3::hash(public.as_bytes()).to_hex();
        Self(hash[..16].to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A secret signing key. Its `Debug` shows only the key id.
#[derive(Clone)]
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    id: KeyId,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.id)
    }
}

impl SigningKey {
    /// The key made from 32 secret random bytes (from the OS's generator: see `keygen`).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let id = KeyId::of(&key.verifying_key());
        Self { key, id }
    }

    /// Reads a secret key file.
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        Self::parse(&read(path)?, &path.display().to_string())
    }

    /// Parses a secret key file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SigningError> {
        let bytes = parse_line(text, origin, Kind::Secret)?;
        Ok(Self::from_seed(fixed(bytes, origin, "secret key")?))
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            key: self.key.verifying_key(),
            id: self.id.clone(),
        }
    }

    /// The text of the secret key file.
    pub fn to_file_text(&self) -> String {
        format!(
            "# shardpress manifest signing key {}: SECRET, keep it private\n{SECRET_TAG} {}\n",
            self.id,
            hex(self.key.as_bytes())
        )
    }

    /// Signs a manifest's exact bytes.
    pub fn sign(&self, manifest: &[u8]) -> ManifestSignature {
        use ed25519_dalek::Signer;
        ManifestSignature {
            key_id: self.id.clone(),
            signature: self.key.sign(manifest),
        }
    }
}

/// A public key, which checks signatures.
#[derive(Debug, Clone)]
pub struct VerifyingKey {
    key: ed25519_dalek::VerifyingKey,
    id: KeyId,
}

impl VerifyingKey {
    /// Reads a public key file.
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        Self::parse(&read(path)?, &path.display().to_string())
    }

    /// Parses a public key file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SigningError> {
        let bytes = parse_line(text, origin, Kind::Public)?;
        let bytes = fixed(bytes, origin, "public key")?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| {
            SigningError::InvalidPublicKey {
                origin: origin.to_string(),
            }
        })?;
        let id = KeyId::of(&key);
        Ok(Self { key, id })
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// The text of the public key file.
    pub fn to_file_text(&self) -> String {
        format!(
            "# shardpress manifest signing key {} (public)\n{PUBLIC_TAG} {}\n",
            self.id,
            hex(self.key.as_bytes())
        )
    }

    /// Checks that `signature` (read from `object`) was made by this key over exactly
    /// `manifest`. Strict: a signature with a non-canonical encoding is refused too.
    pub fn verify(
        &self,
        manifest: &[u8],
        signature: &ManifestSignature,
        object: &str,
    ) -> Result<(), SigningError> {
        if signature.key_id != self.id {
            return Err(SigningError::WrongKey {
                object: object.to_string(),
                found: signature.key_id.clone(),
                expected: self.id.clone(),
            });
        }
        self.key
            .verify_strict(manifest, &signature.signature)
            .map_err(|_| SigningError::BadSignature {
                object: object.to_string(),
                key_id: self.id.clone(),
            })
    }
}

/// A manifest's signature with the id of the key that made it (`manifest.json.sig`).
#[derive(Debug, Clone)]
pub struct ManifestSignature {
    pub key_id: KeyId,
    signature: ed25519_dalek::Signature,
}

impl ManifestSignature {
    /// The text of the signature file.
    pub fn to_text(&self) -> String {
        format!(
            "{SIGNATURE_TAG} {} {}\n",
            self.key_id,
            hex(&self.signature.to_bytes())
        )
    }

    /// Parses a signature file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SigningError> {
        let not_one = || SigningError::NotASignature {
            origin: origin.to_string(),
        };
        let line = content_line(text).ok_or_else(not_one)?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let &[tag, key_id, signature] = fields.as_slice() else {
            return Err(match Kind::of_tag(fields.first().copied().unwrap_or("")) {
                Some(kind) if kind != Kind::Signature => SigningError::WrongKind {
                    origin: origin.to_string(),
                    found: kind.name(),
                    expected: Kind::Signature.name(),
                },
                _ => not_one(),
            });
        };
        if tag != SIGNATURE_TAG
            || key_id.len() != 16
            || !key_id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(not_one());
        }
        let bytes = unhex(signature, origin, "signature")?;
        let bytes: [u8; 64] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| SigningError::WrongLength {
                origin: origin.to_string(),
                what: "signature",
                found: b.len(),
                expected: 64,
            })?;
        Ok(Self {
            key_id: KeyId(key_id.to_ascii_lowercase()),
            signature: ed25519_dalek::Signature::from_bytes(&bytes),
        })
    }
}

/// Writes `PREFIX.key` (secret, mode 0600) and `PREFIX.pub`; refuses to replace either
/// unless `force`. Returns the two paths.
pub fn write_key_pair(
    prefix: &Path,
    key: &SigningKey,
    force: bool,
) -> Result<(PathBuf, PathBuf), SigningError> {
    let with_ext = |ext: &str| {
        let mut path = prefix.as_os_str().to_owned();
        path.push(ext);
        PathBuf::from(path)
    };
    let (secret, public) = (with_ext(".key"), with_ext(".pub"));
    for path in [&secret, &public] {
        if !force && path.symlink_metadata().is_ok() {
            return Err(SigningError::Exists { path: path.clone() });
        }
    }
    write_new(&secret, key.to_file_text().as_bytes(), 0o600)?;
    write_new(
        &public,
        key.verifying_key().to_file_text().as_bytes(),
        0o644,
    )?;
    Ok((secret, public))
}

/// Creates `path` afresh with `mode` (on Unix; an existing file is removed first, so that
/// a secret never lands in a file with wider permissions).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SigningError> {
    let failed = |source| SigningError::Write {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(failed)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(failed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Secret,
    Public,
    Signature,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Secret => SECRET_TAG,
            Kind::Public => PUBLIC_TAG,
            Kind::Signature => SIGNATURE_TAG,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Secret => "shardpress secret key",
            Kind::Public => "shardpress public key",
            Kind::Signature => "shardpress manifest signature",
        }
    }

    fn of_tag(tag: &str) -> Option<Self> {
        [Kind::Secret, Kind::Public, Kind::Signature]
            .into_iter()
            .find(|kind| kind.tag() == tag)
    }
}

fn read(path: &Path) -> Result<String, SigningError> {
    std::fs::read_to_string(path).map_err(|source| SigningError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The first line that is neither blank nor a `#` comment.
fn content_line(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
}

/// The bytes of a key file's `TAG HEX` line, checking the tag is `expected`'s.
fn parse_line(text: &str, origin: &str, expected: Kind) -> Result<Vec<u8>, SigningError> {
    let not_one = || SigningError::NotAKeyFile {
        origin: origin.to_string(),
        expected: expected.name(),
        tag: expected.tag(),
    };
    let line = content_line(text).ok_or_else(not_one)?;
    let mut fields = line.split_whitespace();
    let tag = fields.next().unwrap_or_default();
    match Kind::of_tag(tag) {
        Some(kind) if kind == expected => {}
        Some(kind) => {
            return Err(SigningError::WrongKind {
                origin: origin.to_string(),
                found: kind.name(),
                expected: expected.name(),
            })
        }
        None => return Err(not_one()),
    }
    let (Some(value), None) = (fields.next(), fields.next()) else {
        return Err(not_one());
    };
    let what = match expected {
        Kind::Secret => "secret key",
        Kind::Public => "public key",
        Kind::Signature => "signature",
    };
    unhex(value, origin, what)
}

fn fixed(bytes: Vec<u8>, origin: &str, what: &'static str) -> Result<[u8; 32], SigningError> {
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| SigningError::WrongLength {
            origin: origin.to_string(),
            what,
            found: b.len(),
            expected: 32,
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str, origin: &str, what: &'static str) -> Result<Vec<u8>, SigningError> {
    let bad = |reason: String| SigningError::BadHex {
        origin: origin.to_string(),
        what,
        reason,
    };
    if !text.len().is_multiple_of(2) {
        return Err(bad(format!("an odd number of digits, {}", text.len())));
    }
    text.as_bytes()
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            let digit = |c: u8| (c as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(high), Some(low)) => Ok((high * 16 + low) as u8),
                _ => Err(bad(format!(
                    "{:?} at position {} is not a hex digit pair",
                    String::from_utf8_lossy(pair),
                    2 * i
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_seed([n; 32])
    }

    #[test]
    fn a_key_pair_round_trips_through_its_files_and_signs() {
        let secret = key(7);
        let parsed = SigningKey::parse(&secret.to_file_text(), "a.key").unwrap();
        assert_eq!(parsed.id(), secret.id());
        let public = VerifyingKey::parse(&secret.verifying_key().to_file_text(), "a.pub").unwrap();
        assert_eq!(public.id(), secret.id());
        assert_eq!(public.id().as_str().len(), 16);

        let manifest = b"{\"objects\": []}\n";
        let signature = parsed.sign(manifest);
        let text = signature.to_text();
        let read = ManifestSignature::parse(&text, "manifest.json.sig").unwrap();
        public.verify(manifest, &read, "manifest.json.sig").unwrap();
    }

    #[test]
    fn a_changed_manifest_or_another_key_fails_the_check() {
        let secret = key(1);
        let manifest = b"{\"blake3\": \"00ff\"}\n".to_vec();
        let signature = secret.sign(&manifest);
        let mut changed = manifest.clone();
        changed[12] = b'1';
        let err = secret
            .verifying_key()
            .verify(&changed, &signature, "OUT/manifest.json.sig")
            .unwrap_err();
        assert!(matches!(err, SigningError::BadSignature { .. }), "{err}");
        assert!(err.to_string().contains("OUT/manifest.json.sig"), "{err}");

        let other = key(2).verifying_key();
        let err = other.verify(&manifest, &signature, "sig").unwrap_err();
        assert!(matches!(err, SigningError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains(secret.id().as_str()), "{err}");

        // A signature relabelled with the other key's id still fails, on the bytes.
        let mut forged = ManifestSignature::parse(&signature.to_text(), "sig").unwrap();
        forged.key_id = other.id().clone();
        let err = other.verify(&manifest, &forged, "sig").unwrap_err();
        assert!(matches!(err, SigningError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn a_key_file_of_the_wrong_kind_is_named() {
        let secret = key(3);
        let err = SigningKey::parse(&secret.verifying_key().to_file_text(), "x.pub").unwrap_err();
        assert!(matches!(err, SigningError::WrongKind { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("x.pub") && message.contains("public key"),
            "{message}"
        );

        let err = VerifyingKey::parse(&secret.to_file_text(), "x.key").unwrap_err();
        assert!(err.to_string().contains("secret key"), "{err}");

        let sig = secret.sign(b"m").to_text();
        let err = VerifyingKey::parse(&sig, "m.sig").unwrap_err();
        assert!(matches!(err, SigningError::WrongKind { .. }), "{err}");
        let err = ManifestSignature::parse(&secret.to_file_text(), "k").unwrap_err();
        assert!(matches!(err, SigningError::WrongKind { .. }), "{err}");

        for text in ["", "# only a comment\n", "ssh-ed25519 AAAA", "hello world"] {
            let err = SigningKey::parse(text, "junk").unwrap_err();
            assert!(
                matches!(err, SigningError::NotAKeyFile { .. }),
                "{text:?}: {err}"
            );
            assert!(err.to_string().contains("junk"), "{err}");
        }
        let err =
            SigningKey::parse(&format!("{SECRET_TAG} {} extra", "00".repeat(32)), "k").unwrap_err();
        assert!(matches!(err, SigningError::NotAKeyFile { .. }), "{err}");
    }

    #[test]
    fn bad_hex_and_wrong_lengths_are_refused() {
        let err = SigningKey::parse(&format!("{SECRET_TAG} {}", "zz".repeat(32)), "k").unwrap_err();
        assert!(matches!(err, SigningError::BadHex { .. }), "{err}");
        assert!(err.to_string().contains("position 0"), "{err}");
        let err = SigningKey::parse(&format!("{SECRET_TAG} abc"), "k").unwrap_err();
        assert!(matches!(err, SigningError::BadHex { .. }), "{err}");
        // Multi-byte characters are not hex either (and must not panic).
        let err = SigningKey::parse(&format!("{SECRET_TAG} éa0"), "k").unwrap_err();
        assert!(matches!(err, SigningError::BadHex { .. }), "{err}");

        let err = SigningKey::parse(&format!("{SECRET_TAG} {}", "ab".repeat(31)), "k").unwrap_err();
        assert!(
            matches!(err, SigningError::WrongLength { found: 31, .. }),
            "{err}"
        );
        let err =
            VerifyingKey::parse(&format!("{PUBLIC_TAG} {}", "ab".repeat(33)), "p").unwrap_err();
        assert!(
            matches!(err, SigningError::WrongLength { found: 33, .. }),
            "{err}"
        );
        let short = format!("{SIGNATURE_TAG} {} {}", "0".repeat(16), "ab".repeat(63));
        let err = ManifestSignature::parse(&short, "s").unwrap_err();
        assert!(
            matches!(err, SigningError::WrongLength { found: 63, .. }),
            "{err}"
        );
        let bad_id = format!("{SIGNATURE_TAG} nothex {}", "ab".repeat(64));
        let err = ManifestSignature::parse(&bad_id, "s").unwrap_err();
        assert!(matches!(err, SigningError::NotASignature { .. }), "{err}");
    }

    #[test]
    fn key_files_are_written_once_the_secret_private() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("release");
        let secret = key(9);
        let (key_path, pub_path) = write_key_pair(&prefix, &secret, false).unwrap();
        assert_eq!(key_path, dir.path().join("release.key"));
        assert_eq!(
            SigningKey::load(&key_path).unwrap().id(),
            VerifyingKey::load(&pub_path).unwrap().id()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let err = write_key_pair(&prefix, &key(10), false).unwrap_err();
        assert!(matches!(err, SigningError::Exists { .. }), "{err}");
        assert_eq!(SigningKey::load(&key_path).unwrap().id(), secret.id());
        write_key_pair(&prefix, &key(10), true).unwrap();
        assert_eq!(SigningKey::load(&key_path).unwrap().id(), key(10).id());

        let err = SigningKey::load(&dir.path().join("absent.key")).unwrap_err();
        assert!(matches!(err, SigningError::Read { .. }), "{err}");
        assert!(err.to_string().contains("absent.key"), "{err}");
    }
}
