//! Who may call what: bearer tokens checked on every call of both gRPC services, the caller's
//! role handed to the handlers, and the `--allow` prefixes a submission's locations must lie
//! under.
//!
//! Roles: the admin token may do everything (and serve as a worker's token); the worker token
//! only the worker service; each named client token only the job service, and there only its
//! own jobs. With no token configured every caller is an admin: the coordinator refuses that
//! on a non-loopback address unless told `--insecure` (see the binary). Within the worker
//! service, a worker id is bound to the process that registered it by a session secret
//! ([`crate::Coordinator::check_session`]).
//!
//! Tokens are compared by their BLAKE3 hashes (constant-time equality), never logged.

use std::sync::Arc;

use shardpress_proto::transport::SESSION_HEADER;
use shardpress_store::allow::AllowList;
use tonic::{Request, Status};

/// What a caller may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Admin,
    Worker,
    /// A named client: submits jobs and sees, follows and cancels only its own.
    Client(String),
}

/// The authenticated caller of one request (in the request's extensions).
#[derive(Debug, Clone)]
pub struct Caller {
    pub role: Role,
    /// The connection comes from this host.
    pub loopback: bool,
}

impl Caller {
    /// The owner a job submitted by this caller records.
    pub fn owner(&self) -> Option<String> {
        match &self.role {
            Role::Client(name) => Some(name.clone()),
            _ => None,
        }
    }

    /// Whether this caller may see and cancel a job owned by `owner`.
    pub fn may_access(&self, owner: Option<&str>) -> bool {
        match &self.role {
            Role::Admin => true,
            Role::Worker => false,
            Role::Client(name) => owner == Some(name.as_str()),
        }
    }
}

/// The tokens and prefixes a coordinator is configured with.
#[derive(Debug, Default)]
pub struct AuthConfig {
    pub admin_token: Option<String>,
    pub worker_token: Option<String>,
    /// `(name, token)` of each client.
    pub client_tokens: Vec<(String, String)>,
    /// Locations clients may name (see [`AuthConfig::check_locations`]).
    pub allow: AllowList,
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read {path}: {message}")]
    Unreadable { path: String, message: String },
    #[error("{path} line {line}: {reason}")]
    BadClientLine {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The least length of a token: a guessable token is no token.
pub const MIN_TOKEN_CHARS: usize = 16;

impl AuthConfig {
    /// Whether any token is required.
    pub fn requires_tokens(&self) -> bool {
        self.admin_token.is_some() || self.worker_token.is_some() || !self.client_tokens.is_empty()
    }

    /// Reads a client tokens file: one `NAME TOKEN` a line; blank lines and `#` comments
    /// are skipped.
    pub fn read_client_tokens(
        path: &std::path::Path,
    ) -> Result<Vec<(String, String)>, AuthConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| AuthConfigError::Unreadable {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let mut clients = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| AuthConfigError::BadClientLine {
                path: shown.clone(),
                line: index + 1,
                reason: reason.to_string(),
            };
            let mut fields = line.split_whitespace();
            let (Some(name), Some(token), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad("expected `NAME TOKEN`"));
            };
            if clients.iter().any(|(n, _)| n == name) {
                return Err(bad("this client name appears twice"));
            }
            clients.push((name.to_string(), token.to_string()));
        }
        Ok(clients)
    }

    /// Refuses short tokens and a token given two roles.
    pub fn validate(&self) -> Result<(), AuthConfigError> {
        let mut all: Vec<(&str, &str)> = Vec::new();
        if let Some(t) = &self.admin_token {
            all.push(("the admin token", t));
        }
        if let Some(t) = &self.worker_token {
            all.push(("the worker token", t));
        }
        for (name, t) in &self.client_tokens {
            all.push((name, t));
        }
        for (i, (who, token)) in all.iter().enumerate() {
            if token.chars().count() < MIN_TOKEN_CHARS {
                return Err(AuthConfigError::Invalid(format!(
                    "{who} is shorter than {MIN_TOKEN_CHARS} characters (make one with `openssl rand -hex 32`)"
                )));
            }
            if let Some((other, _)) = all[..i].iter().find(|(_, t)| t == token) {
                return Err(AuthConfigError::Invalid(format!(
                    "{other} and {who} are the same token: each role needs its own"
                )));
            }
        }
        Ok(())
    }

    /// Submissions name a model and an output: with `--allow` prefixes both must lie under
    /// one; without any, only a caller on this host may name locations at all.
    pub fn check_locations(
        &self,
        caller: &Caller,
        model_url: &str,
        out_url: &str,
    ) -> Result<(), Status> {
        if self.allow.is_empty() {
            if caller.loopback {
                return Ok(());
            }
            return Err(Status::permission_denied(
                "this coordinator takes model and output locations from other hosts only under \
                 its --allow prefixes, and it has none",
            ));
        }
        for (what, url) in [("model", model_url), ("output", out_url)] {
            self.allow
                .check(what, url)
                .map_err(|e| Status::permission_denied(e.to_string()))?;
        }
        Ok(())
    }
}

/// Which service a [`Gate`] guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Jobs,
    Workers,
}

/// The token hashes of a configuration.
struct Tokens {
    admin: Option<blake3::Hash>,
    worker: Option<blake3::Hash>,
    clients: Vec<(String, blake3::Hash)>,
}

/// The interceptor in front of one service: checks the bearer token and puts the [`Caller`]
/// in the request's extensions.
#[derive(Clone)]
pub struct Gate {
    tokens: Option<Arc<Tokens>>,
    service: Service,
}

impl Gate {
    pub fn new(config: &AuthConfig, service: Service) -> Self {
        let hash = |t: &String| blake3::hash(t.as_bytes());
        let tokens = config.requires_tokens().then(|| {
            Arc::new(Tokens {
                admin: config.admin_token.as_ref().map(hash),
                worker: config.worker_token.as_ref().map(hash),
                clients: config
                    .client_tokens
                    .iter()
                    .map(|(name, token)| (name.clone(), hash(token)))
                    .collect(),
            })
        });
        Self { tokens, service }
    }

    fn role(&self, request: &Request<()>) -> Result<Role, Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(Role::Admin);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "this coordinator requires a token: give --token-file FILE or set SHARDPRESS_TOKEN",
                )
            })?;
        let presented = blake3::hash(presented.trim().as_bytes());
        let role = if tokens.admin == Some(presented) {
            Role::Admin
        } else if tokens.worker == Some(presented) {
            Role::Worker
        } else if let Some((name, _)) = tokens.clients.iter().find(|(_, t)| *t == presented) {
            Role::Client(name.clone())
        } else {
            return Err(Status::unauthenticated(
                "the token is not valid for this coordinator",
            ));
        };
        match (self.service, &role) {
            (Service::Jobs, Role::Worker) => Err(Status::permission_denied(
                "a worker token cannot use the job service (submit, status, cancel)",
            )),
            (Service::Workers, Role::Client(_)) => Err(Status::permission_denied(
                "a client token cannot use the worker service",
            )),
            _ => Ok(role),
        }
    }
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let role = self.role(&request)?;
        let loopback = request
            .remote_addr()
            .is_some_and(|addr| addr.ip().is_loopback());
        request.extensions_mut().insert(Caller { role, loopback });
        Ok(request)
    }
}

/// The caller a [`Gate`] put in `request` (an admin when no gate ran, as in unit tests).
pub fn caller<T>(request: &Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller {
            role: Role::Admin,
            loopback: true,
        })
}

/// The worker session `request` carries, if any.
pub fn session<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn config() -> AuthConfig {
        AuthConfig {
            admin_token: Some("admin-token-0123456789".into()),
            worker_token: Some("worker-token-0123456789".into()),
            client_tokens: vec![("alice".into(), "alice-token-0123456789".into())],
            allow: AllowList::default(),
        }
    }

    fn call(gate: &mut Gate, token: Option<&str>) -> Result<Role, Status> {
        let mut request = Request::new(());
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        gate.call(request).map(|r| caller(&r).role)
    }

    #[test]
    fn tokens_map_to_roles_per_service() {
        let config = config();
        let mut jobs = Gate::new(&config, Service::Jobs);
        let mut workers = Gate::new(&config, Service::Workers);
        assert_eq!(
            call(&mut jobs, Some("admin-token-0123456789")).unwrap(),
            Role::Admin
        );
        assert_eq!(
            call(&mut jobs, Some("alice-token-0123456789")).unwrap(),
            Role::Client("alice".into())
        );
        assert_eq!(
            call(&mut workers, Some("worker-token-0123456789")).unwrap(),
            Role::Worker
        );
        let code = |r: Result<Role, Status>| r.unwrap_err().code();
        assert_eq!(code(call(&mut jobs, None)), tonic::Code::Unauthenticated);
        assert_eq!(
            code(call(&mut jobs, Some("admin-token-012345678X"))),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(call(&mut jobs, Some("worker-token-0123456789"))),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            code(call(&mut workers, Some("alice-token-0123456789"))),
            tonic::Code::PermissionDenied
        );
        let mut open = Gate::new(&AuthConfig::default(), Service::Jobs);
        assert_eq!(call(&mut open, None).unwrap(), Role::Admin);
    }

    #[test]
    fn clients_see_only_their_own_jobs() {
        let alice = Caller {
            role: Role::Client("alice".into()),
            loopback: false,
        };
        assert!(alice.may_access(Some("alice")));
        assert!(!alice.may_access(Some("bob")));
        assert!(!alice.may_access(None));
        let admin = Caller {
            role: Role::Admin,
            loopback: false,
        };
        assert!(admin.may_access(Some("bob")) && admin.may_access(None));
    }

    #[test]
    fn weak_or_shared_tokens_and_bad_client_files_are_refused() {
        let mut weak = config();
        weak.worker_token = Some("short".into());
        assert!(weak.validate().unwrap_err().to_string().contains("shorter"));
        let mut shared = config();
        shared.worker_token = shared.admin_token.clone();
        assert!(shared
            .validate()
            .unwrap_err()
            .to_string()
            .contains("same token"));
        assert!(config().validate().is_ok());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients");
        std::fs::write(
            &path,
            "# team\nalice aaaaaaaaaaaaaaaaaaaa\n\nbob bbbbbbbbbbbbbbbbbbbb\n",
        )
        .unwrap();
        let clients = AuthConfig::read_client_tokens(&path).unwrap();
        assert_eq!(clients.len(), 2);
        assert_eq!(clients[1].0, "bob");
        std::fs::write(&path, "alice\n").unwrap();
        let error = AuthConfig::read_client_tokens(&path)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("line 1") && error.contains("NAME TOKEN"),
            "{error}"
        );
    }

    #[test]
    fn remote_callers_need_allowed_prefixes() {
        let remote = Caller {
            role: Role::Admin,
            loopback: false,
        };
        let local = Caller {
            role: Role::Admin,
            loopback: true,
        };
        let open = AuthConfig::default();
        assert!(open.check_locations(&local, "/m", "/o").is_ok());
        let refused = open.check_locations(&remote, "/m", "/o").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains("--allow"));

        let allowed = AuthConfig {
            allow: AllowList::new(&["s3://bucket/team".into()]).unwrap(),
            ..AuthConfig::default()
        };
        assert!(allowed
            .check_locations(&remote, "s3://bucket/team/m", "s3://bucket/team/o")
            .is_ok());
        let refused = allowed
            .check_locations(&local, "s3://bucket/team/m", "/etc/out")
            .unwrap_err();
        assert!(
            refused.message().contains("output"),
            "{}",
            refused.message()
        );
    }
}
