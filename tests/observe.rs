//! The coordinator's HTTP port on a real multi-process cluster: Prometheus metrics scraped
//! while a job runs (slowed workers, so the scrapes see it move), the status page and its
//! JSON, and the `report.html` every job writes beside `report.json`.
//! The page itself is checked in a real browser by tests/python/test_status_page.py.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// A plain HTTP/1.1 GET over a fresh connection: the status code, headers and body.
fn get(addr: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the HTTP port");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_lowercase(), body.to_string())
}

/// The value of one series of a Prometheus text scrape (`None` if absent).
fn series(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn metric(scrape: &str, name: &str) -> f64 {
    series(scrape, name).unwrap_or_else(|| panic!("no {name} in the scrape:\n{scrape}"))
}

#[test]
fn metrics_move_while_a_job_runs_and_the_status_page_shows_it() {
    let mut cluster = TestCluster::start_with(&["--http-listen", "127.0.0.1:0"]);
    let http = cluster
        .http
        .clone()
        .expect("the coordinator's HTTP address");
    let model = cluster.dir.path().join("model");
    gen_model(&model, "6MB", "bf16", 5000);
    let out = cluster.dir.path().join("out");
    let slow = ["--chunk-mb", "0.25", "--debug-delay-per-chunk-ms", "150"];
    cluster.add_worker("slow-a", &slow);
    cluster.add_worker("slow-b", &slow);
    let (status, _, idle) = get(&http, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(metric(&idle, "shardpress_tasks_leased_total"), 0.0);
    let client = cluster
        .compress_command(&model, &out, "int8")
        .spawn()
        .unwrap();

    // Scrape until the job has ended, keeping what was seen while it ran.
    let started = Instant::now();
    let mut queued_seen = Vec::new();
    let mut completed_while_running = 0.0;
    let mut running_scrapes = 0;
    let mut page_checked = false;
    let job_id = loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the job never ended"
        );
        let (_, _, scrape) = get(&http, "/metrics");
        if metric(&scrape, "shardpress_jobs{state=\"running\"}") == 1.0 {
            running_scrapes += 1;
            queued_seen.push(metric(&scrape, "shardpress_tasks_queued"));
            completed_while_running = metric(&scrape, "shardpress_tasks_completed_total");
            assert!(metric(&scrape, "shardpress_workers_live") >= 1.0);
        }
        let (_, _, json) = get(&http, "/api/status");
        let status: serde_json::Value = serde_json::from_str(&json).unwrap();
        let Some(job) = status["jobs"].get(0) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if job["state"] == "running" && !page_checked && job["tasks_done"].as_u64() > Some(0) {
            // Progress, an ETA and the workers' current tasks, while it runs.
            assert!(job["bytes_done"].as_u64() > Some(0), "{job}");
            assert!(job["eta_seconds"].as_f64().is_some(), "{job}");
            let workers = status["workers"].as_array().unwrap();
            assert_eq!(workers.len(), 2, "{status}");
            assert!(workers.iter().any(|w| w["name"] == "slow-a"), "{status}");
            page_checked = true;
        }
        if !matches!(job["state"].as_str(), Some("running" | "finalizing")) {
            break job["id"].as_str().unwrap().to_string();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_success(&client.wait_with_output().unwrap(), "compress");
    let (_, _, done) = get(&http, "/metrics");
    let tasks = metric(&done, "shardpress_tasks_completed_total");

    assert!(
        running_scrapes >= 3,
        "only {running_scrapes} scrapes saw the job run"
    );
    assert!(tasks >= 4.0, "{done}");
    assert!(
        page_checked,
        "the status JSON never showed the job with progress"
    );
    // The queue drained while we watched, and some tasks were done before the job ended.
    let first = queued_seen[0];
    assert!(first > 0.0, "queued {queued_seen:?}");
    assert!(
        queued_seen.iter().any(|&q| q < first),
        "queued {queued_seen:?}"
    );
    assert!(completed_while_running > 0.0 && completed_while_running < tasks);
    assert!(metric(&done, "shardpress_tasks_leased_total") >= tasks);
    assert_eq!(metric(&done, "shardpress_jobs{state=\"succeeded\"}"), 1.0);
    assert_eq!(metric(&done, "shardpress_jobs{state=\"running\"}"), 0.0);
    assert_eq!(metric(&done, "shardpress_tasks_queued"), 0.0);
    let model_bytes: u64 = files_under(&model)
        .iter()
        .filter(|f| f.ends_with(".safetensors"))
        .map(|f| std::fs::metadata(model.join(f)).unwrap().len())
        .sum();
    let read = metric(&done, "shardpress_input_bytes_total");
    assert!(
        read > 0.0 && read <= model_bytes as f64,
        "read {read} of {model_bytes}"
    );
    assert!(metric(&done, "shardpress_output_bytes_total") > 0.0);
    let by_worker: f64 = ["slow-a", "slow-b"]
        .iter()
        .filter_map(|w| {
            series(
                &done,
                &format!("shardpress_worker_input_bytes_total{{worker=\"{w}\"}}"),
            )
        })
        .sum();
    assert_eq!(by_worker, read, "{done}");

    // The page, and the finished job's per-layer errors in its JSON.
    let (status, head, page) = get(&http, "/");
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(head.contains("content-security-policy"), "{head}");
    assert!(page.contains("<title>shardpress coordinator</title>"));
    let (_, head, json) = get(&http, "/api/status");
    assert!(head.contains("application/json"), "{head}");
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let job = &status["jobs"][0];
    assert_eq!(job["id"], job_id.as_str());
    assert_eq!(job["state"], "succeeded");
    let layers = job["report"]["layers"]
        .as_array()
        .expect("the per-layer table");
    assert!(layers.iter().any(|l| l["layer"] == "layer 0"), "{job}");
    assert_eq!(job["report"]["gates_passed"], true);
    assert_eq!(get(&http, "/nowhere").0, 404);

    // report.html beside report.json, listed in the manifest, and the output verifies.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains(&job_id) && html.contains("<svg"));
    assert!(manifest_objects(&out).contains_key("report.html"));
    assert_success(&shardpress(&["verify", out.to_str().unwrap()]), "verify");
}

#[test]
fn an_http_port_in_use_is_refused_clearly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = shardpress(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        &addr,
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains(&format!("cannot listen on {addr} for HTTP (--http-listen)")),
        "{message}"
    );
}
