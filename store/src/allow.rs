//! Allow lists of storage prefixes (`--allow`): which model and output locations a coordinator
//! accepts from clients, and which a worker reads and writes whatever its coordinator says.
//!
//! Locations are compared where they really are ([`StoreLocation::identity`]: symlinks
//! resolved on a local filesystem), on whole path segments (`/data/models` does not allow
//! `/data/models-private`), and any location spelled with a `..` segment is refused outright.

use crate::{StoreError, StoreLocation};

/// A set of allowed prefixes; empty allows nothing.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    /// Each prefix as given (for messages) and where it really is.
    prefixes: Vec<(String, String)>,
}

impl AllowList {
    /// Opens each prefix (a path or URL, as `--model` takes them).
    pub fn new(prefixes: &[String]) -> Result<Self, StoreError> {
        let prefixes = prefixes
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(|p| {
                refuse_dot_segments(p)?;
                Ok((p.to_string(), StoreLocation::open(p)?.identity()))
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Self { prefixes })
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// The prefixes as given, for messages.
    pub fn describe(&self) -> String {
        let names: Vec<_> = self
            .prefixes
            .iter()
            .map(|(given, _)| crate::redact(given))
            .collect();
        names.join(", ")
    }

    /// Ok when `url_or_path` lies under one of the prefixes; otherwise an error naming it
    /// and the prefixes (`what`: "model", "output").
    pub fn check(&self, what: &str, url_or_path: &str) -> Result<(), StoreError> {
        refuse_dot_segments(url_or_path)?;
        let identity = StoreLocation::open(url_or_path)?.identity();
        let inside = self.prefixes.iter().any(|(_, prefix)| {
            let prefix = prefix.trim_end_matches('/');
            identity == prefix
                || identity
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('/'))
        });
        if inside {
            return Ok(());
        }
        let allowed = match self.prefixes.is_empty() {
            true => "none is allowed".to_string(),
            false => format!("allowed: {}", self.describe()),
        };
        Err(StoreError::InvalidUrl {
            url: url_or_path.to_string(),
            reason: format!(
                "the {what} location is not under an allowed prefix (--allow; {allowed})"
            ),
        })
    }
}

/// Refuses a location with a `.` or `..` path segment (also percent-encoded): where it leads
/// depends on how each layer resolves it.
fn refuse_dot_segments(url_or_path: &str) -> Result<(), StoreError> {
    let decoded = url_or_path.to_ascii_lowercase().replace("%2e", ".");
    let dotted = decoded
        .split(['/', '\\'])
        .any(|segment| segment == ".." || segment == ".");
    if dotted {
        return Err(StoreError::InvalidUrl {
            url: url_or_path.to_string(),
            reason: "a location with `.` or `..` segments is refused; give it plainly".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::AllowList;

    #[test]
    fn prefixes_match_whole_segments_and_resolve_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let allowed = root.join("data");
        std::fs::create_dir_all(allowed.join("models")).unwrap();
        std::fs::create_dir_all(root.join("data-private")).unwrap();
        std::fs::create_dir_all(root.join("secret")).unwrap();
        std::os::unix::fs::symlink(root.join("secret"), allowed.join("link")).unwrap();
        let list = AllowList::new(&[allowed.display().to_string()]).unwrap();
        let path = |p: &str| root.join(p).display().to_string();

        assert!(list.check("model", &path("data/models")).is_ok());
        assert!(list.check("output", &path("data/new/out")).is_ok());
        assert!(list
            .check("model", &format!("file://{}", path("data/models")))
            .is_ok());
        assert!(list.check("model", &path("data")).is_ok());
        for refused in [
            path("data-private"),
            path("secret"),
            path("data/link"),
            path("data/link/inner"),
            path("data/../secret"),
            path("data/%2E%2E/secret"),
            "/etc".to_string(),
            "s3://bucket/data".to_string(),
        ] {
            let error = list.check("model", &refused).unwrap_err().to_string();
            assert!(
                error.contains("allowed") || error.contains("segments"),
                "{refused}: {error}"
            );
        }
    }

    #[test]
    fn s3_prefixes_and_an_empty_list() {
        let list = AllowList::new(&["s3://models/team-a/".into()]).unwrap();
        assert!(list.check("model", "s3://models/team-a/llama").is_ok());
        assert!(list.check("model", "s3://models/team-a").is_ok());
        assert!(list.check("model", "s3://models/team-ab").is_err());
        assert!(list.check("model", "s3://models/team-b/x").is_err());
        assert!(list.check("model", "s3://other/team-a/x").is_err());
        let none = AllowList::new(&[]).unwrap();
        assert!(none.is_empty());
        let error = none.check("output", "/tmp/x").unwrap_err().to_string();
        assert!(error.contains("none is allowed"), "{error}");
    }
}
