//! A whole cluster in one process: the coordinator's gRPC server and workers as tasks of one
//! tokio runtime, talking over loopback, with the model in a `memory://` store (one per
//! process, shared by every location in it). The same job run with one worker into
//! `memory://` (outputs staged and renamed by the coordinator) and with two workers into an
//! `s3://` bucket whose store the test injects (an in-memory store taking multipart uploads
//! as S3 does: the coordinator begins each attempt's upload, the workers upload parts, the
//! coordinator completes it) gives byte-identical outputs, and `verify` passes on both.

mod common;

use std::sync::Arc;
use std::time::Duration;

use object_store::memory::InMemory;
use shardpress_coordinator::finalize::{verify, Manifest, MANIFEST_NAME};
use shardpress_coordinator::{Coordinator, CoordinatorConfig};
use shardpress_core::recipe::Recipe;
use shardpress_proto::v1::{GetJobRequest, JobState, SubmitJobRequest};
use shardpress_proto::JobServiceClient;
use shardpress_store::StoreLocation;
use shardpress_worker::WorkerConfig;
use tokio::sync::watch;

use common::gen_model;

/// Runs `recipe` on the model at `model_url` into `out_url` with `workers` in-process workers;
/// returns the manifest.
async fn run_in_process(model_url: &str, out_url: &str, workers: usize) -> Manifest {
    let (listener, addr) = shardpress_coordinator::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let coordinator = Coordinator::new(CoordinatorConfig {
        default_task_budget: 1024 * 1024,
        ..Default::default()
    });
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let server = tokio::spawn(shardpress_coordinator::serve(
        listener,
        coordinator,
        Default::default(),
        until_stopped(stopped.clone()),
    ));
    let url = format!("http://{addr}");
    let mut running = Vec::new();
    for i in 0..workers {
        let config = WorkerConfig {
            coordinator_url: url.clone(),
            name: format!("in-process-{i}"),
            threads: 1,
            chunk_bytes: 256 * 1024,
            ..Default::default()
        };
        running.push(tokio::spawn(shardpress_worker::run_worker(
            config,
            until_stopped(stopped.clone()),
        )));
    }
    let mut client = JobServiceClient::connect(url).await.unwrap();
    let job = client
        .submit_job(SubmitJobRequest {
            model_url: model_url.into(),
            out_url: out_url.into(),
            recipe_yaml: Recipe::preset("int4-g128").unwrap().source_yaml,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(job.task_count > 2, "{} tasks", job.task_count);
    let request = GetJobRequest {
        job_id: job.job_id.clone(),
    };
    let status = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let status = client.get_job(request.clone()).await.unwrap().into_inner();
            if status.is_terminal() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the job did not end within 2 minutes");
    assert_eq!(status.state(), JobState::Succeeded, "{}", status.message);
    stop.send(true).unwrap();
    for worker in running {
        worker.await.unwrap().unwrap();
    }
    server.await.unwrap().unwrap();

    let out = StoreLocation::open(out_url).unwrap();
    let (manifest, problems) = verify(&out).await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    // Nothing but the manifest's objects: no journal, no staging object left.
    let mut names = out.list_all().await.unwrap();
    names.retain(|n| n != MANIFEST_NAME);
    assert_eq!(names.len(), manifest.objects.len(), "{names:?}");
    manifest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_in_one_process_compresses_a_model_in_a_memory_store() {
    let dir = tempfile::tempdir().unwrap();
    gen_model(dir.path(), "4MB", "bf16", 2);
    let model = StoreLocation::open("memory:///in-process/model").unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        model
            .put(&name, std::fs::read(&path).unwrap().into())
            .await
            .unwrap();
    }
    let one = run_in_process(model.url(), "memory:///in-process/one", 1).await;
    let bucket = Arc::new(InMemory::new());
    shardpress_store::register_store("s3://injected", bucket.clone(), Some(bucket.clone()))
        .unwrap();
    let two = run_in_process(model.url(), "s3://injected/two", 2).await;
    let hashes = |m: &Manifest| -> Vec<(String, String)> {
        let objects = (m.objects.iter()).filter(|o| !o.name.starts_with("report."));
        objects
            .map(|o| (o.name.clone(), o.blake3.clone()))
            .collect()
    };
    assert_eq!(hashes(&one), hashes(&two));
}
