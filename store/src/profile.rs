//! S3 settings from the AWS CLI's profile files, as the AWS SDKs read them: when the
//! environment gives no access key, the profile named by `AWS_PROFILE` (or `default`) of
//! `~/.aws/credentials` (`AWS_SHARED_CREDENTIALS_FILE`) gives the keys and session token, and
//! that of `~/.aws/config` (`AWS_CONFIG_FILE`, sections `[profile NAME]`) the region and
//! endpoint when the environment does not. Environment variables always win.
//!
//! Profiles that get credentials another way (`role_arn`, `sso_*`, `credential_process`) are
//! refused with a message saying how to export plain credentials, rather than silently
//! falling through to the instance metadata service.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::StoreError;

/// Settings a profile cannot hold as keys and values we use.
const UNSUPPORTED: [&str; 4] = [
    "role_arn",
    "credential_process",
    "sso_session",
    "sso_start_url",
];

/// The sections of an INI file: name -> key -> value.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut sections: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim().to_string();
            sections.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        if let (Some(section), Some((key, value))) = (&current, line.split_once('=')) {
            let entry = sections.entry(section.clone()).or_default();
            entry.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    sections
}

fn file_of(env: &HashMap<String, String>, variable: &str, default: &str) -> Option<PathBuf> {
    match env.get(variable) {
        Some(path) => Some(PathBuf::from(path)),
        None => env
            .get("HOME")
            .map(|home| PathBuf::from(home).join(default)),
    }
}

/// The object_store options (`aws_access_key_id`, `aws_region`, …) that the profile files
/// add to those of `env` (the process's `AWS_*` variables and `HOME`).
pub(crate) fn profile_options(
    env: &HashMap<String, String>,
) -> Result<Vec<(String, String)>, StoreError> {
    let named = env
        .get("AWS_PROFILE")
        .or_else(|| env.get("AWS_DEFAULT_PROFILE"));
    let profile = named.map_or("default", String::as_str);
    let credentials_file = file_of(env, "AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
    let config_file = file_of(env, "AWS_CONFIG_FILE", ".aws/config");
    let read = |path: &Option<PathBuf>| {
        path.as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|text| parse_ini(&text))
            .unwrap_or_default()
    };
    let credentials = read(&credentials_file);
    let config = read(&config_file);
    let config_section = match profile {
        "default" => "default".to_string(),
        name => format!("profile {name}"),
    };
    let from_credentials = credentials.get(profile);
    let from_config = config.get(&config_section);
    if from_credentials.is_none() && from_config.is_none() {
        if let Some(name) = named {
            let files: Vec<String> = [&credentials_file, &config_file]
                .into_iter()
                .flatten()
                .map(|p| p.display().to_string())
                .collect();
            return Err(StoreError::InvalidUrl {
                url: "s3://".into(),
                reason: format!(
                    "AWS_PROFILE={name}: no such profile in {}",
                    files.join(" or ")
                ),
            });
        }
        return Ok(Vec::new());
    }
    let get = |key: &str| {
        (from_credentials.and_then(|s| s.get(key)))
            .or_else(|| from_config.and_then(|s| s.get(key)))
            .cloned()
    };
    let mut options = Vec::new();
    if !env.contains_key("AWS_ACCESS_KEY_ID") {
        match (get("aws_access_key_id"), get("aws_secret_access_key")) {
            (Some(key), Some(secret)) => {
                options.push(("aws_access_key_id".to_string(), key));
                options.push(("aws_secret_access_key".to_string(), secret));
                if let Some(token) = get("aws_session_token") {
                    options.push(("aws_session_token".to_string(), token));
                }
            }
            _ => {
                if let Some(key) = UNSUPPORTED.iter().find(|k| get(k).is_some()) {
                    return Err(StoreError::InvalidUrl {
                        url: "s3://".into(),
                        reason: format!(
                            "AWS profile {profile} gets its credentials with {key}, which shardpress does not support; export plain credentials instead (`aws configure export-credentials --profile {profile} --format env`)"
                        ),
                    });
                }
            }
        }
    }
    let region_set = env.contains_key("AWS_REGION") || env.contains_key("AWS_DEFAULT_REGION");
    if let (false, Some(region)) = (region_set, get("region")) {
        options.push(("aws_region".to_string(), region));
    }
    let endpoint_set = env.contains_key("AWS_ENDPOINT") || env.contains_key("AWS_ENDPOINT_URL");
    if let (false, Some(endpoint)) = (endpoint_set, get("endpoint_url")) {
        options.push(("aws_endpoint".to_string(), endpoint));
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(dir: &std::path::Path, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut env: HashMap<String, String> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.insert("HOME".into(), dir.display().to_string());
        env
    }

    fn write_files(dir: &std::path::Path) {
        std::fs::create_dir_all(dir.join(".aws")).unwrap();
        std::fs::write(
            dir.join(".aws/credentials"),
            "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = s1\n\n\
             [team]\naws_access_key_id=AKTEAM\naws_secret_access_key=s2\naws_session_token=tok\n\n\
             [assumed]\nrole_arn = arn:aws:iam::1:role/x\n",
        )
        .unwrap();
        std::fs::write(
            dir.join(".aws/config"),
            "[default]\nregion = eu-west-1\n[profile team]\nregion=us-west-2\nendpoint_url = http://minio:9000\n",
        )
        .unwrap();
    }

    fn value<'a>(options: &'a [(String, String)], key: &str) -> Option<&'a str> {
        options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn profiles_give_keys_region_and_endpoint_unless_the_environment_does() {
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path());
        let default = profile_options(&env(dir.path(), &[])).unwrap();
        assert_eq!(value(&default, "aws_access_key_id"), Some("AKDEFAULT"));
        assert_eq!(value(&default, "aws_region"), Some("eu-west-1"));
        let team = profile_options(&env(dir.path(), &[("AWS_PROFILE", "team")])).unwrap();
        assert_eq!(value(&team, "aws_access_key_id"), Some("AKTEAM"));
        assert_eq!(value(&team, "aws_session_token"), Some("tok"));
        assert_eq!(value(&team, "aws_region"), Some("us-west-2"));
        assert_eq!(value(&team, "aws_endpoint"), Some("http://minio:9000"));
        // The environment wins.
        let set = [
            ("AWS_PROFILE", "team"),
            ("AWS_ACCESS_KEY_ID", "AKENV"),
            ("AWS_REGION", "ap-south-1"),
        ];
        let env_first = profile_options(&env(dir.path(), &set)).unwrap();
        assert_eq!(value(&env_first, "aws_access_key_id"), None);
        assert_eq!(value(&env_first, "aws_region"), None);
        assert_eq!(value(&env_first, "aws_endpoint"), Some("http://minio:9000"));
    }

    #[test]
    fn a_missing_or_unsupported_profile_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path());
        let missing = profile_options(&env(dir.path(), &[("AWS_PROFILE", "nope")]));
        let message = missing.unwrap_err().to_string();
        assert!(
            message.contains("AWS_PROFILE=nope: no such profile"),
            "{message}"
        );
        let assumed = profile_options(&env(dir.path(), &[("AWS_PROFILE", "assumed")]));
        let message = assumed.unwrap_err().to_string();
        assert!(
            message.contains("role_arn") && message.contains("export-credentials"),
            "{message}"
        );
        // No files and no profile named: nothing added, no error.
        let empty = tempfile::tempdir().unwrap();
        assert!(profile_options(&env(empty.path(), &[])).unwrap().is_empty());
    }
}
