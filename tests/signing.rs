//! Signed manifests through the real binary: `keygen` writes a key pair, a coordinator given
//! `--signing-key` signs its job's manifest (manifest.json.sig), and `verify --key` accepts
//! that output but fails on one flipped byte of any object or of the manifest, on another
//! key's public file, and on a missing signature. A bad key file stops the coordinator at
//! startup, naming the file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `keygen --out PREFIX`; returns the secret and public key files.
fn keygen(prefix: &Path) -> (PathBuf, PathBuf) {
    let output = shardpress(&["keygen", "--out", prefix.to_str().unwrap()]);
    assert_success(&output, "keygen");
    let with = |ext: &str| PathBuf::from(format!("{}.{ext}", prefix.display()));
    (with("key"), with("pub"))
}

/// The key id `keygen` printed into the public key file's comment.
fn key_id(public: &Path) -> String {
    let text = std::fs::read_to_string(public).unwrap();
    let id = text
        .split_whitespace()
        .find(|w| w.len() == 16 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .expect("a key id in the public key file's comment");
    id.to_string()
}

fn verify(out: &Path, key: Option<&Path>) -> std::process::Output {
    let mut args = vec!["verify", out.to_str().unwrap()];
    if let Some(key) = key {
        args.extend(["--key", key.to_str().unwrap()]);
    }
    shardpress(&args)
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts `verify` fails and its stderr contains `needle`.
fn assert_verify_fails(out: &Path, key: Option<&Path>, needle: &str, what: &str) {
    let output = verify(out, key);
    assert!(
        !output.status.success(),
        "{what}: verify passed\n{}",
        stdout(&output)
    );
    assert!(
        stderr(&output).contains(needle),
        "{what}: expected {needle:?} in\n{}",
        stderr(&output)
    );
}

#[test]
fn keygen_writes_a_private_secret_key_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("signer");
    let (secret, public) = keygen(&prefix);
    let secret_text = std::fs::read_to_string(&secret).unwrap();
    assert!(secret_text.contains("shardpress-ed25519-secret "));
    assert!(std::fs::read_to_string(&public)
        .unwrap()
        .contains("shardpress-ed25519-public "));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "secret key mode {mode:o}");
    }
    let again = shardpress(&["keygen", "--out", prefix.to_str().unwrap()]);
    assert!(!again.status.success(), "keygen replaced an existing key");
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), secret_text);
    let forced = shardpress(&["keygen", "--out", prefix.to_str().unwrap(), "--force"]);
    assert_success(&forced, "keygen --force");
    assert_ne!(std::fs::read_to_string(&secret).unwrap(), secret_text);
}

#[test]
fn a_signed_output_verifies_and_one_flipped_byte_anywhere_fails() {
    let work = tempfile::tempdir().unwrap();
    let (secret, public) = keygen(&work.path().join("a"));
    let (_, other) = keygen(&work.path().join("b"));
    let model = work.path().join("model");
    gen_model(&model, "3MB", "bf16", 1);
    let mut cluster = TestCluster::start_with(&["--signing-key", secret.to_str().unwrap()]);
    cluster.add_worker("w1", &[]);
    let out = work.path().join("out");
    let done = cluster.compress(&model, &out, "int8");
    assert_success(&done, "compress");
    let id = key_id(&public);
    assert!(
        stdout(&done).contains(&format!("manifest signed by key {id}")),
        "{}",
        stdout(&done)
    );
    let signature = std::fs::read_to_string(out.join("manifest.json.sig")).unwrap();
    assert!(signature.contains(&id), "{signature}");

    let ok = verify(&out, Some(&public));
    assert_success(&ok, "verify --key");
    assert!(
        stdout(&ok).contains(&format!("signature by key {id} valid")),
        "{}",
        stdout(&ok)
    );
    let unchecked = verify(&out, None);
    assert_success(&unchecked, "verify without a key");
    assert!(
        stdout(&unchecked).contains("not checked"),
        "{}",
        stdout(&unchecked)
    );
    assert_verify_fails(&out, Some(&other), "not by the given key", "another key");

    // One flipped byte of any object: its checksum no longer matches the signed manifest.
    let objects = manifest_objects(&out);
    assert!(objects.len() >= 3, "{:?}", objects.keys());
    for (name, bytes) in &objects {
        let mut flipped = bytes.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 0x01;
        std::fs::write(out.join(name), &flipped).unwrap();
        assert_verify_fails(
            &out,
            Some(&public),
            name,
            &format!("flipped byte in {name}"),
        );
        std::fs::write(out.join(name), bytes).unwrap();
    }
    assert_success(&verify(&out, Some(&public)), "verify after restoring");

    // One changed digit of a checksum in the manifest: the signature no longer matches.
    let manifest_path = out.join("manifest.json");
    let manifest = std::fs::read(&manifest_path).unwrap();
    let needle = b"\"blake3\": \"";
    let at = manifest
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("a checksum in the manifest")
        + needle.len();
    let mut changed = manifest.clone();
    changed[at] = if changed[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(&manifest_path, &changed).unwrap();
    assert_verify_fails(
        &out,
        Some(&public),
        "does not match the manifest's bytes",
        "changed manifest",
    );
    std::fs::write(&manifest_path, &manifest).unwrap();

    // No signature: with --key that is a failure; without, the output still verifies.
    std::fs::remove_file(out.join("manifest.json.sig")).unwrap();
    assert_verify_fails(&out, Some(&public), "is missing", "missing signature");
    let plain = verify(&out, None);
    assert_success(&plain, "verify of an unsigned output without a key");
    assert!(!stdout(&plain).contains("signed"), "{}", stdout(&plain));
}

#[test]
fn run_signs_with_the_key_named_by_the_environment() {
    let work = tempfile::tempdir().unwrap();
    let (secret, public) = keygen(&work.path().join("k"));
    let model = work.path().join("model");
    gen_model(&model, "2MB", "bf16", 5000);
    let out = work.path().join("out");
    let output = Command::new(BIN)
        .args(["run", "--workers", "1", "--recipe", "int8"])
        .args(["--model", model.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .env("SHARDPRESS_SIGNING_KEY_FILE", &secret)
        .output()
        .unwrap();
    assert_success(&output, "run");
    assert_success(&verify(&out, Some(&public)), "verify --key");
}

/// Starts a coordinator with `--signing-key key`, expecting it to exit by itself (within
/// 30 s); returns its stderr.
fn coordinator_refusing(key: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("coordinator.log");
    let mut child = Command::new(BIN)
        .args(["coordinator", "--listen", "127.0.0.1:0"])
        .args(["--signing-key", key.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the coordinator started with the bad key {}", key.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn a_missing_or_wrong_kind_of_signing_key_stops_the_coordinator_at_startup() {
    let work = tempfile::tempdir().unwrap();
    let (_, public) = keygen(&work.path().join("k"));
    let message = coordinator_refusing(&public);
    assert!(
        message.contains(public.to_str().unwrap()) && message.contains("public key"),
        "{message}"
    );
    let absent = work.path().join("absent.key");
    let message = coordinator_refusing(&absent);
    assert!(message.contains("absent.key"), "{message}");
}
