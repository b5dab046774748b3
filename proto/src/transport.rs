//! How clients and workers reach a coordinator: the channel (plain HTTP/2 or TLS, with a client
//! certificate for mutual TLS) and the credentials every call carries (a bearer token, and for
//! a registered worker the session the coordinator gave it).
//!
//! The coordinator's side of the same names is in `shardpress_coordinator::auth`.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

/// The metadata key of a worker's session (see `RegisterWorkerResponse.session`).
pub const SESSION_HEADER: &str = "x-shardpress-session";

/// A channel whose calls carry [`Credentials`].
pub type AuthChannel = InterceptedService<Channel, Credentials>;

/// What can go wrong before the first call.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid coordinator URL {url:?}: {message}")]
    InvalidUrl { url: String, message: String },
    #[error("cannot read {what} {path}: {message}")]
    Unreadable {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot reach the coordinator at {url}: {message}")]
    Unreachable { url: String, message: String },
}

/// TLS settings of a client or worker (all files PEM).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// The CA that signed the coordinator's certificate (default: the system's roots are not
    /// used; a CA is needed for `https://`).
    pub ca_pem: Option<Vec<u8>>,
    /// Certificate and key presented to a coordinator that requires mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the coordinator's certificate must carry (default: the URL's host).
    pub domain: Option<String>,
}

/// Everything a connection to the coordinator needs besides its URL.
#[derive(Debug, Clone, Default)]
pub struct ClientSecurity {
    /// Sent as `authorization: Bearer TOKEN` on every call.
    pub token: Option<String>,
    pub tls: Option<ClientTls>,
}

impl ClientSecurity {
    /// Reads a token file (surrounding whitespace dropped) or, without one, the token in the
    /// environment variable `env` (unset or empty: no token).
    pub fn token_from(
        file: Option<&std::path::Path>,
        env: &str,
    ) -> Result<Option<String>, TransportError> {
        let token = match file {
            Some(path) => read_file("token file", path)
                .and_then(|bytes| {
                    String::from_utf8(bytes).map_err(|_| {
                        TransportError::Invalid(format!(
                            "token file {} is not text",
                            path.display()
                        ))
                    })
                })?
                .trim()
                .to_string(),
            None => std::env::var(env).unwrap_or_default().trim().to_string(),
        };
        if token.is_empty() {
            return Ok(None);
        }
        if AsciiMetadataValue::try_from(format!("Bearer {token}")).is_err() {
            return Err(TransportError::Invalid(
                "the token holds characters a gRPC header cannot carry (use printable ASCII)"
                    .into(),
            ));
        }
        Ok(Some(token))
    }

    /// Reads the TLS files; `None` when none is given.
    pub fn tls_from(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
        domain: Option<String>,
    ) -> Result<Option<ClientTls>, TransportError> {
        let identity_pem = match (cert, key) {
            (Some(cert), Some(key)) => Some((
                read_file("certificate", cert)?,
                read_file("private key", key)?,
            )),
            (None, None) => None,
            _ => {
                return Err(TransportError::Invalid(
                    "--tls-cert and --tls-key go together (a client certificate and its key)"
                        .into(),
                ))
            }
        };
        let ca_pem = ca.map(|p| read_file("CA certificate", p)).transpose()?;
        if ca_pem.is_none() && identity_pem.is_none() && domain.is_none() {
            return Ok(None);
        }
        Ok(Some(ClientTls {
            ca_pem,
            identity_pem,
            domain,
        }))
    }
}

pub fn read_file(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|e| TransportError::Unreadable {
        what,
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// The credentials interceptor: adds the bearer token and, once set, the worker's session.
/// Clones share the session.
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<AsciiMetadataValue>,
    session: Arc<RwLock<Option<AsciiMetadataValue>>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

impl Credentials {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            authorization: token.and_then(|t| format!("Bearer {t}").try_into().ok()),
            session: Arc::default(),
        }
    }

    /// Sends `session` with every later call (of this and every clone).
    pub fn set_session(&self, session: &str) {
        let value = session.try_into().ok();
        *self.session.write().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        if let Some(authorization) = &self.authorization {
            metadata.insert("authorization", authorization.clone());
        }
        if let Some(session) = &*self.session.read().unwrap_or_else(|e| e.into_inner()) {
            metadata.insert(SESSION_HEADER, session.clone());
        }
        Ok(request)
    }
}

/// The endpoint for `url` with `security`'s TLS settings (`https://` needs TLS settings; TLS
/// settings need `https://`).
pub fn endpoint(url: &str, security: &ClientSecurity) -> Result<Endpoint, TransportError> {
    let invalid = |message: &str| TransportError::InvalidUrl {
        url: url.to_string(),
        message: message.to_string(),
    };
    let endpoint = Channel::from_shared(url.to_string()).map_err(|e| invalid(&e.to_string()))?;
    let tls = match (&security.tls, url.starts_with("https://")) {
        (None, false) => return Ok(endpoint),
        (Some(_), false) => {
            return Err(invalid(
                "TLS settings were given but the URL is not https:// (use https://HOST:PORT)",
            ))
        }
        (None, true) => return Err(invalid(NEEDS_CA)),
        (Some(tls), true) => tls,
    };
    let ca = tls.ca_pem.as_ref().ok_or_else(|| invalid(NEEDS_CA))?;
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = &tls.identity_pem {
        config = config.identity(Identity::from_pem(cert, key));
    }
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    endpoint
        .tls_config(config)
        .map_err(|e| invalid(&format!("TLS settings refused: {e}")))
}

/// Why an `https://` URL without a CA cannot be used.
const NEEDS_CA: &str =
    "an https:// coordinator needs --tls-ca (the CA that signed its certificate)";

/// Connects to `url`, retrying for up to `patience` while the coordinator starts. A TLS
/// handshake that fails (wrong CA, wrong name, a coordinator requiring a client certificate)
/// fails the same way as an unreachable coordinator, with the TLS error in the message.
pub async fn connect(
    url: &str,
    security: &ClientSecurity,
    patience: Duration,
) -> Result<(Channel, Credentials), TransportError> {
    let endpoint = endpoint(url, security)?;
    let started = std::time::Instant::now();
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok((channel, Credentials::new(security.token.as_deref()))),
            Err(e) if started.elapsed() >= patience => {
                return Err(TransportError::Unreachable {
                    url: url.to_string(),
                    message: error_chain(&e),
                })
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// An error with its sources (tonic's transport errors say little at the top).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
