//! The coordinator's HTTP port (`--http-listen`): Prometheus metrics at `/metrics`, a status
//! page at `/` and the JSON it polls at `/api/status`.
//!
//! The page ([`STATUS_PAGE`], `status.html`) is one self-contained file — no external
//! script, style or font, so it works where the cluster has no Internet — and builds its
//! tables with `textContent` only, so nothing a job carries (names, URLs, error messages) is
//! ever parsed as HTML; a Content-Security-Policy forbids anything but its own inline code
//! and requests to this origin. URLs and messages are redacted before they get here (see
//! [`crate::state::ClusterView`]).
//!
//! Read-only by design: nothing here changes a job, so the port can be exposed to a cluster's
//! monitoring without a token. It tells whoever reaches it which models and outputs the jobs
//! use, so keep it on the cluster's network (see deploy/).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header::{HeaderName, CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::state::{ClusterView, JobView, WorkerView};
use crate::Coordinator;

/// The status page: HTML with its own inline style and script, polling `api/status`.
pub const STATUS_PAGE: &str = include_str!("status.html");

const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'";

/// What the handlers share.
struct Shared {
    coordinator: Arc<Coordinator>,
    /// Per-layer tables of ended jobs, parsed once from their reports (which no longer change).
    digests: Mutex<HashMap<String, Arc<ReportDigest>>>,
}

/// What the status page shows of a finished job's report.
#[derive(Debug, Default, Serialize)]
pub struct ReportDigest {
    /// `report.json`'s `layers`: per layer, tensors, parameters, bits per weight, weighted
    /// and worst relative error, minimum cosine.
    pub layers: serde_json::Value,
    pub gates_passed: Option<bool>,
    pub input_bytes: Option<u64>,
    pub output_bytes: Option<u64>,
    pub rel_fro_error_weighted: Option<f64>,
}

impl ReportDigest {
    /// The digest of a `report.json`; `None` if there is no report or it is not JSON.
    pub fn of(report_json: &str) -> Option<Self> {
        let report: serde_json::Value = serde_json::from_str(report_json).ok()?;
        let summary = &report["summary"];
        Some(ReportDigest {
            layers: report["layers"].clone(),
            gates_passed: report["gates"]["passed"].as_bool(),
            input_bytes: summary["input_bytes"].as_u64(),
            output_bytes: summary["output_bytes"].as_u64(),
            rel_fro_error_weighted: summary["rel_fro_error_weighted"].as_f64(),
        })
    }
}

/// `/api/status`: the cluster, and for each ended job its report's digest.
#[derive(Serialize)]
struct StatusJson {
    version: &'static str,
    jobs: Vec<JobJson>,
    workers: Vec<WorkerView>,
}

#[derive(Serialize)]
struct JobJson {
    #[serde(flatten)]
    job: JobView,
    #[serde(serialize_with = "digest_or_null")]
    report: Option<Arc<ReportDigest>>,
}

fn digest_or_null<S: serde::Serializer>(
    digest: &Option<Arc<ReportDigest>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    digest.as_deref().serialize(serializer)
}

/// The routes, for [`serve`] and for tests that drive them without a socket.
pub fn router(coordinator: Arc<Coordinator>) -> Router {
    let shared = Arc::new(Shared {
        coordinator,
        digests: Mutex::new(HashMap::new()),
    });
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status_json))
        .with_state(shared)
}

/// Serves [`router`] on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    coordinator: Arc<Coordinator>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(coordinator))
        .with_graceful_shutdown(shutdown)
        .await
}

fn with_headers(body: String, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn status_page() -> Response {
    let mut response = with_headers(STATUS_PAGE.to_string(), "text/html; charset=utf-8");
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("DENY"),
    );
    response
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let view = shared.coordinator.view();
    let text = shared.coordinator.metrics.encode(&view);
    with_headers(text, crate::metrics::CONTENT_TYPE)
}

async fn status_json(State(shared): State<Arc<Shared>>) -> Response {
    let view = shared.coordinator.view();
    let ClusterView { jobs, workers } = view;
    let jobs = jobs
        .into_iter()
        .map(|job| JobJson {
            report: shared.digest(&job),
            job,
        })
        .collect();
    let status = StatusJson {
        version: env!("CARGO_PKG_VERSION"),
        jobs,
        workers,
    };
    // Plain data always serializes.
    let body = serde_json::to_string(&status).unwrap_or_default();
    with_headers(body, "application/json")
}

impl Shared {
    /// The digest of `job`'s report once it has ended with one.
    fn digest(&self, job: &JobView) -> Option<Arc<ReportDigest>> {
        let id = job.id.as_str();
        let mut digests = self.digests.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(job.state.as_str(), "running" | "finalizing") {
            // Resumed under the same id: its next report replaces the last.
            digests.remove(id);
            return None;
        }
        if let Some(digest) = digests.get(id) {
            return Some(digest.clone());
        }
        let report = self.coordinator.report(id).ok()??;
        let digest = Arc::new(ReportDigest::of(&report)?);
        digests.insert(id.to_string(), digest.clone());
        Some(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_keeps_the_layers_and_the_verdict() {
        let report = r#"{"summary": {"input_bytes": 10, "output_bytes": 4,
            "rel_fro_error_weighted": 0.1}, "gates": {"passed": true},
            "layers": [{"layer": "layer 0", "min_cosine": 0.99}]}"#;
        let digest = ReportDigest::of(report).unwrap();
        assert_eq!(digest.layers[0]["layer"], "layer 0");
        assert_eq!(digest.gates_passed, Some(true));
        assert_eq!(digest.output_bytes, Some(4));
        assert!(ReportDigest::of("").is_none());
    }

    #[test]
    fn the_page_is_self_contained() {
        let page = STATUS_PAGE.to_lowercase();
        for external in ["src=\"http", "href=\"http", "@import", "//cdn", "<link"] {
            assert!(!page.contains(external), "the page loads {external}");
        }
        // Text goes in through textContent, never parsed as HTML.
        assert!(!page.contains("innerhtml"));
        assert!(!page.contains("insertadjacenthtml"));
        assert!(!page.contains("document.write"));
    }
}
