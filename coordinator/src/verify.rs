//! `verify`: an output checked against its manifest — every object it lists re-hashed,
//! nothing else in the folder — and, with a public key, the manifest's signature over its
//! exact bytes ([`crate::signing`]). The signature and the checksums are checked on the same
//! bytes of the manifest, read once.

use shardpress_store::{StoreError, StoreLocation};

use crate::finalize::{Manifest, MANIFEST_NAME};
use crate::signing::{KeyId, ManifestSignature, SigningError, VerifyingKey, SIGNATURE_NAME};

/// Re-hashes every object the manifest at `out` lists; returns the problems found.
pub async fn verify(out: &StoreLocation) -> Result<(Manifest, Vec<String>), StoreError> {
    let verification = verify_output(out, None).await?;
    Ok((verification.manifest, verification.problems))
}

/// What became of a manifest's signature in [`verify_output`].
#[derive(Debug)]
pub enum SignatureCheck {
    /// No key was given and the output has no signature.
    NotSigned,
    /// No key was given; the output has a signature, by this key (`None`: unreadable).
    Unchecked(Option<KeyId>),
    /// The given key signed exactly these manifest bytes.
    Valid(KeyId),
    /// A key was given, and the signature is missing, by another key or does not match.
    Invalid(SigningError),
}

/// The outcome of [`verify_output`]: the manifest, the objects that do not match it, and
/// its signature's check.
#[derive(Debug)]
pub struct Verification {
    pub manifest: Manifest,
    pub problems: Vec<String>,
    pub signature: SignatureCheck,
}

/// A signature file is one short line; anything much longer is not one.
const MAX_SIGNATURE_BYTES: u64 = 4096;

/// Checks the manifest at `out`: its signature against `key` (when given; without one, only
/// whether there is a signature), then every object it lists, re-hashed. The signature and
/// the checksums are checked on the same bytes of the manifest, read once.
pub async fn verify_output(
    out: &StoreLocation,
    key: Option<&VerifyingKey>,
) -> Result<Verification, StoreError> {
    let bytes = out.get(MANIFEST_NAME).await?;
    let signature = check_signature(out, &bytes, key).await?;
    let (manifest, problems) = verify_manifest(out, &bytes).await?;
    Ok(Verification {
        manifest,
        problems,
        signature,
    })
}

async fn check_signature(
    out: &StoreLocation,
    manifest: &[u8],
    key: Option<&VerifyingKey>,
) -> Result<SignatureCheck, StoreError> {
    let object = out.describe(SIGNATURE_NAME);
    let parsed = match out.size(SIGNATURE_NAME).await {
        Err(StoreError::NotFound { .. }) => None,
        Err(e) => return Err(e),
        Ok(size) if size > MAX_SIGNATURE_BYTES => Some(Err(SigningError::NotASignature {
            origin: format!("{object} ({size} bytes)"),
        })),
        Ok(_) => {
            let text = out.get(SIGNATURE_NAME).await?;
            Some(ManifestSignature::parse(
                &String::from_utf8_lossy(&text),
                &object,
            ))
        }
    };
    Ok(match (key, parsed) {
        (None, None) => SignatureCheck::NotSigned,
        (None, Some(parsed)) => SignatureCheck::Unchecked(parsed.ok().map(|s| s.key_id)),
        (Some(key), None) => SignatureCheck::Invalid(SigningError::MissingSignature {
            object,
            key_id: key.id().clone(),
        }),
        (Some(_), Some(Err(e))) => SignatureCheck::Invalid(e),
        (Some(key), Some(Ok(signature))) => match key.verify(manifest, &signature, &object) {
            Ok(()) => SignatureCheck::Valid(signature.key_id),
            Err(e) => SignatureCheck::Invalid(e),
        },
    })
}

/// Re-hashes every object the manifest (`bytes`, read from `out`) lists.
async fn verify_manifest(
    out: &StoreLocation,
    bytes: &[u8],
) -> Result<(Manifest, Vec<String>), StoreError> {
    let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| StoreError::Invalid {
        object: out.describe(MANIFEST_NAME),
        reason: format!("not a shardpress manifest: {e}"),
    })?;
    let mut problems = Vec::new();
    if manifest.objects.is_empty() {
        problems.push(format!("{} lists no objects", out.describe(MANIFEST_NAME)));
    }
    // Whatever else is there did not come from this job: a leftover of another run or a
    // stray file, which a reader of the folder would take for part of the output.
    let listed: std::collections::HashSet<&str> =
        manifest.objects.iter().map(|e| e.name.as_str()).collect();
    for name in out.list_all().await? {
        let ours = name == MANIFEST_NAME || name == SIGNATURE_NAME;
        if !ours && !listed.contains(name.as_str()) {
            problems.push(format!(
                "{}: not listed in the manifest (left by another run?)",
                out.describe(&name)
            ));
        }
    }
    for entry in &manifest.objects {
        match out.blake3(&entry.name).await {
            Ok((_, size)) if size != entry.size => problems.push(format!(
                "{}: size {size}, manifest says {}",
                out.describe(&entry.name),
                entry.size
            )),
            Ok((hash, _)) if hash != entry.blake3 => problems.push(format!(
                "{}: blake3 {hash}, manifest says {}",
                out.describe(&entry.name),
                entry.blake3
            )),
            Ok(_) => {}
            Err(e) => problems.push(e.to_string()),
        }
    }
    Ok((manifest, problems))
}
