//! A cluster that can be exposed: tokens and roles, TLS and mutual TLS with generated
//! certificates, `--allow` prefixes on the coordinator and on workers, worker ids bound to
//! their process, a coordinator that will not listen openly by accident, and secrets that
//! never reach a log, a report or an error. Real processes on loopback.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use shardpress_proto::transport::{ClientSecurity, Credentials};
use shardpress_proto::v1::{
    CompleteTaskRequest, FailTaskRequest, HeartbeatRequest, RegisterWorkerRequest, TaskRef,
};
use shardpress_proto::WorkerServiceClient;

const ADMIN: &str = "admin-7f3e9c1d2b4a5e6f7a8b9c0d";
const WORKER: &str = "worker-1a2b3c4d5e6f7a8b9c0d1e2f";
const ALICE: &str = "alice-0f1e2d3c4b5a69788796a5b4";
const BOB: &str = "bob-99887766554433221100aabbcc";

/// Writes the token files into `dir`; returns the coordinator's arguments.
fn token_files(dir: &Path) -> Vec<String> {
    std::fs::write(dir.join("admin.token"), format!("{ADMIN}\n")).unwrap();
    std::fs::write(dir.join("worker.token"), WORKER).unwrap();
    std::fs::write(dir.join("alice.token"), ALICE).unwrap();
    std::fs::write(dir.join("bob.token"), BOB).unwrap();
    std::fs::write(
        dir.join("clients"),
        format!("# name token\nalice {ALICE}\nbob {BOB}\n"),
    )
    .unwrap();
    let arg = |name: &str| dir.join(name).display().to_string();
    vec![
        "--admin-token-file".into(),
        arg("admin.token"),
        "--worker-token-file".into(),
        arg("worker.token"),
        "--client-tokens-file".into(),
        arg("clients"),
    ]
}

fn run(cluster: &TestCluster, args: &[&str], token: Option<&str>) -> Output {
    let mut command = Command::new(BIN);
    command.args(args).args(["--coordinator", &cluster.url]);
    command.env_remove("SHARDPRESS_TOKEN");
    if let Some(token) = token {
        command.env("SHARDPRESS_TOKEN", token);
    }
    command.output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn tokens_decide_who_may_do_what() {
    let work = tempfile::tempdir().unwrap();
    let args = token_files(work.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cluster = TestCluster::start_with(&args);
    let token_file = |name: &str| work.path().join(name).display().to_string();

    // No token, a wrong token, a worker's token: refused, exit code 3, nothing echoed.
    let none = run(&cluster, &["jobs"], None);
    assert_eq!(none.status.code(), Some(3), "{}", text(&none));
    assert!(text(&none).contains("requires a token"), "{}", text(&none));
    let wrong = run(&cluster, &["jobs"], Some("not-the-token-at-all-000"));
    assert_eq!(wrong.status.code(), Some(3), "{}", text(&wrong));
    assert!(text(&wrong).contains("not valid"), "{}", text(&wrong));
    assert!(!text(&wrong).contains("not-the-token"), "{}", text(&wrong));
    let as_worker = run(&cluster, &["jobs"], Some(WORKER));
    assert!(
        text(&as_worker).contains("worker token cannot use the job service"),
        "{}",
        text(&as_worker)
    );

    // A worker with a client's token is refused at once; with the worker token it works.
    let refused = Command::new(BIN)
        .args(["worker", "--coordinator", &cluster.url])
        .args(["--token-file", &token_file("alice.token")])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("client token cannot use the worker service"),
        "{}",
        text(&refused)
    );
    cluster.add_worker("w1", &["--token-file", &token_file("worker.token")]);

    // Alice runs a job; it is hers.
    let model = work.path().join("model");
    gen_model(&model, "2MB", "bf16", 1);
    let out = work.path().join("out");
    let done = cluster
        .compress_command(&model, &out, "int8")
        .args(["--token-file", &token_file("alice.token")])
        .output()
        .unwrap();
    assert_success(&done, "alice's job");
    let listed = run(&cluster, &["jobs", "--json"], Some(ALICE));
    assert_success(&listed, "alice lists");
    let jobs: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let job_id = jobs[0]["job_id"]
        .as_str()
        .expect("alice sees her job")
        .to_string();

    // Bob neither sees nor cancels it; the admin does both.
    let bob_lists = run(&cluster, &["jobs", "--json"], Some(BOB));
    assert_success(&bob_lists, "bob lists");
    let bob_jobs: serde_json::Value = serde_json::from_slice(&bob_lists.stdout).unwrap();
    assert_eq!(bob_jobs.as_array().map(Vec::len), Some(0), "{bob_jobs}");
    for verb in ["status", "cancel", "watch"] {
        let denied = run(&cluster, &[verb, &job_id], Some(BOB));
        assert_eq!(denied.status.code(), Some(3), "{verb}: {}", text(&denied));
        assert!(
            text(&denied).contains("submitted by another client"),
            "{verb}: {}",
            text(&denied)
        );
    }
    let admin = run(&cluster, &["status", &job_id], Some(ADMIN));
    assert_success(&admin, "admin status");
    assert!(text(&admin).contains("succeeded"), "{}", text(&admin));
}

#[test]
fn a_worker_id_is_no_use_without_its_session() {
    let work = tempfile::tempdir().unwrap();
    let args = token_files(work.path());
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--lease-ttl-secs", "5"]);
    let mut cluster = TestCluster::start_with(&args);
    let worker_token = work.path().join("worker.token").display().to_string();
    cluster.add_worker(
        "honest",
        &[
            "--token-file",
            &worker_token,
            "--debug-delay-per-chunk-ms",
            "150",
        ],
    );
    let model = work.path().join("model");
    gen_model(&model, "2MB", "bf16", 1);
    let out = work.path().join("out");
    let mut job = cluster
        .compress_command(&model, &out, "int8")
        .args([
            "--token-file",
            &work.path().join("admin.token").display().to_string(),
        ])
        .spawn()
        .unwrap();
    cluster.wait_for_log("coordinator", "task leased", Duration::from_secs(60));
    let log = std::fs::read_to_string(cluster.log_path("coordinator")).unwrap();
    let leased = log.lines().find(|l| l.contains("task leased")).unwrap();
    let field = |name: &str| {
        let at = leased.find(&format!("{name}=")).unwrap() + name.len() + 1;
        leased[at..]
            .split(|c: char| c.is_whitespace())
            .next()
            .unwrap()
            .trim_matches('"')
            .to_string()
    };
    let task = TaskRef {
        job_id: field("job"),
        task_index: field("task").parse().unwrap(),
        attempt: field("attempt").parse().unwrap(),
        worker_id: field("worker"),
    };

    // A process holding the worker token registers itself, then acts as the honest worker.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let security = ClientSecurity {
            token: Some(WORKER.into()),
            tls: None,
        };
        let (channel, credentials) =
            shardpress_proto::transport::connect(&cluster.url, &security, Duration::from_secs(5))
                .await
                .unwrap();
        let mut rogue = WorkerServiceClient::with_interceptor(channel, credentials.clone());
        let registered = rogue
            .register_worker(RegisterWorkerRequest {
                name: "rogue".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        credentials.set_session(&registered.session);
        let completed = rogue
            .complete_task(CompleteTaskRequest {
                task: Some(task.clone()),
                output_bytes: 1,
                output_blake3: "0".repeat(64),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!completed.accepted);
        assert!(
            completed.reason.contains("another process"),
            "{}",
            completed.reason
        );
        let heartbeat = rogue
            .heartbeat(HeartbeatRequest {
                task: Some(task.clone()),
                bytes_done: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!heartbeat.keep_going);
        rogue
            .fail_task(FailTaskRequest {
                task: Some(task.clone()),
                message: "forged".into(),
                retryable: false,
                worker_leaving: false,
            })
            .await
            .unwrap();
        // Without any session the id is refused too.
        let bare = Credentials::new(Some(WORKER));
        let (channel, _) =
            shardpress_proto::transport::connect(&cluster.url, &security, Duration::from_secs(5))
                .await
                .unwrap();
        let mut bare = WorkerServiceClient::with_interceptor(channel, bare);
        let completed = bare
            .complete_task(CompleteTaskRequest {
                task: Some(task.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!completed.accepted);
    });

    // The honest worker's job ends as if nothing happened: every object verified.
    let status = job.wait().unwrap();
    assert!(status.success(), "the job failed after forged calls");
    let verified = shardpress(&["verify", out.to_str().unwrap()]);
    assert_success(&verified, "verify");
    let log = std::fs::read_to_string(cluster.log_path("coordinator")).unwrap();
    assert!(!log.contains("forged"), "a forged failure was recorded");
}

#[test]
fn an_open_coordinator_listens_only_on_loopback_unless_insecure() {
    let refused = Command::new(BIN)
        .args(["coordinator", "--listen", "0.0.0.0:0"])
        .env_remove("SHARDPRESS_ADMIN_TOKEN")
        .env_remove("SHARDPRESS_WORKER_TOKEN")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    assert!(text(&refused).contains("--insecure"), "{}", text(&refused));

    let weak = Command::new(BIN)
        .args(["coordinator", "--listen", "127.0.0.1:0"])
        .env("SHARDPRESS_ADMIN_TOKEN", "short")
        .output()
        .unwrap();
    assert_eq!(weak.status.code(), Some(3), "{}", text(&weak));
    assert!(text(&weak).contains("shorter than 16"), "{}", text(&weak));

    // With --insecure it starts (and says so in its log).
    let cluster = TestCluster::start_with(&["--insecure"]);
    let listed = run(&cluster, &["jobs"], None);
    assert_success(&listed, "jobs on a loopback coordinator");
}

/// A non-loopback address of this host, to be a "remote" client of a coordinator on it.
fn non_loopback_ip() -> std::net::IpAddr {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: connecting a UDP socket only picks the route's source address.
    socket.connect("10.255.255.1:9").unwrap();
    let ip = socket.local_addr().unwrap().ip();
    assert!(
        !ip.is_loopback() && !ip.is_unspecified(),
        "no non-loopback address: {ip}"
    );
    ip
}

#[test]
fn submissions_and_workers_stay_under_their_allowed_prefixes() {
    let work = tempfile::tempdir().unwrap();
    let allowed = work.path().join("allowed");
    let elsewhere = work.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let model = allowed.join("model");
    gen_model(&model, "2MB", "bf16", 1);
    let allowed_arg = allowed.display().to_string();

    let mut cluster = TestCluster::start_with(&["--allow", &allowed_arg]);
    for (model, out, what) in [
        (model.clone(), elsewhere.join("out"), "output"),
        (PathBuf::from("/etc"), allowed.join("out2"), "model"),
        (
            model.clone(),
            allowed.join("x/../../elsewhere/out"),
            "segments",
        ),
    ] {
        let refused = cluster.compress(&model, &out, "int8");
        assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
        assert!(text(&refused).contains(what), "{what}: {}", text(&refused));
        assert!(!out.exists(), "{} was created", out.display());
    }

    // A worker allowed only `elsewhere` refuses the tasks of a job in `allowed`, writing
    // nothing; a worker allowed there runs them.
    cluster.add_worker("narrow", &["--allow", &elsewhere.display().to_string()]);
    let out = allowed.join("out");
    let mut job = cluster
        .compress_command(&model, &out, "int8")
        .spawn()
        .unwrap();
    cluster.wait_for_log(
        "narrow",
        "not under an allowed prefix",
        Duration::from_secs(60),
    );
    let outputs: Vec<String> = files_under(&out)
        .into_iter()
        .filter(|f| f.ends_with(".safetensors") || f.contains("attempts/"))
        .collect();
    assert!(outputs.is_empty(), "a refused worker wrote {outputs:?}");
    cluster.kill_worker("narrow");
    cluster.add_worker("wide", &["--allow", &allowed_arg]);
    assert!(job.wait().unwrap().success());
    assert_success(&shardpress(&["verify", out.to_str().unwrap()]), "verify");

    // A worker told of a coordinator on another host must be given prefixes.
    let remote = Command::new(BIN)
        .args(["worker", "--coordinator", "http://10.1.2.3:50051"])
        .output()
        .unwrap();
    assert_eq!(remote.status.code(), Some(3), "{}", text(&remote));
    assert!(text(&remote).contains("--allow"), "{}", text(&remote));
}

#[test]
fn remote_clients_name_no_location_without_allowed_prefixes() {
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    gen_model(&model, "2MB", "bf16", 1);
    let ip = non_loopback_ip();
    std::fs::write(work.path().join("admin.token"), ADMIN).unwrap();
    let token = work.path().join("admin.token").display().to_string();
    let cluster = TestCluster::start_on(&format!("{ip}:0"), &["--admin-token-file", &token], &[]);
    let refused = cluster
        .compress_command(&model, &work.path().join("out"), "int8")
        .args(["--token-file", &token])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    assert!(
        text(&refused).contains("only under its --allow prefixes"),
        "{}",
        text(&refused)
    );
}

/// A CA, a coordinator certificate for `localhost` and a client certificate, as PEM files in
/// `dir`; a second, unrelated CA too.
fn certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let write = |name: &str, pem: String| std::fs::write(dir.join(name), pem).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    write("ca.pem", ca_cert.pem());
    for (name, names) in [
        ("server", vec!["localhost".to_string()]),
        ("client", vec!["worker-1".to_string()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        write(&format!("{name}.pem"), cert.pem());
        write(&format!("{name}.key"), key.serialize_pem());
    }
    let other_key = KeyPair::generate().unwrap();
    let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    write("other-ca.pem", other.self_signed(&other_key).unwrap().pem());
}

#[test]
fn tls_and_mutual_tls_with_generated_certificates() {
    let work = tempfile::tempdir().unwrap();
    certificates(work.path());
    let file = |name: &str| work.path().join(name).display().to_string();
    std::fs::write(work.path().join("admin.token"), ADMIN).unwrap();
    let mut cluster = TestCluster::start_with(&[
        "--tls-cert",
        &file("server.pem"),
        "--tls-key",
        &file("server.key"),
        "--tls-client-ca",
        &file("ca.pem"),
        "--admin-token-file",
        &file("admin.token"),
    ]);
    // By address: the certificate names `localhost`, which --tls-domain says to expect.
    cluster.url = cluster.url.replace("http://", "https://");
    let tls = [
        "--tls-domain",
        "localhost",
        "--tls-ca",
        &file("ca.pem"),
        "--tls-cert",
        &file("client.pem"),
        "--tls-key",
        &file("client.key"),
    ];
    let admin_token = file("admin.token");
    let mut worker_args = tls.to_vec();
    worker_args.extend(["--token-file", &admin_token]);
    cluster.add_worker("w1", &worker_args);

    let model = work.path().join("model");
    gen_model(&model, "2MB", "bf16", 1);
    let out = work.path().join("out");
    let done = cluster
        .compress_command(&model, &out, "int8")
        .args(tls)
        .args(["--token-file", &file("admin.token")])
        .output()
        .unwrap();
    assert_success(&done, "a job over mutual TLS");
    assert_success(&shardpress(&["verify", out.to_str().unwrap()]), "verify");

    let attempt = |extra: &[&str]| {
        Command::new(BIN)
            .args(["jobs", "--coordinator", &cluster.url])
            .args(["--token-file", &file("admin.token")])
            .args(extra)
            .output()
            .unwrap()
    };
    assert_success(&attempt(&tls), "jobs over mutual TLS");
    // No client certificate, a CA that did not sign the coordinator's, plain HTTP/2.
    let no_cert = attempt(&["--tls-ca", &file("ca.pem"), "--tls-domain", "localhost"]);
    assert!(!no_cert.status.success(), "{}", text(&no_cert));
    let other_ca = attempt(&[
        "--tls-domain",
        "localhost",
        "--tls-ca",
        &file("other-ca.pem"),
        "--tls-cert",
        &file("client.pem"),
        "--tls-key",
        &file("client.key"),
    ]);
    assert!(!other_ca.status.success(), "{}", text(&other_ca));
    assert!(
        text(&other_ca).to_lowercase().contains("certificate"),
        "{}",
        text(&other_ca)
    );
    let plain = Command::new(BIN)
        .args([
            "jobs",
            "--coordinator",
            &cluster.url.replace("https://", "http://"),
        ])
        .args(["--token-file", &file("admin.token")])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "{}", text(&plain));
    let no_ca = Command::new(BIN)
        .args(["jobs", "--coordinator", &cluster.url])
        .output()
        .unwrap();
    assert_eq!(no_ca.status.code(), Some(1), "{}", text(&no_ca));
    assert!(text(&no_ca).contains("--tls-ca"), "{}", text(&no_ca));
}

/// An S3 endpoint on loopback that refuses every request (403: not retried); its port.
fn forbidding_endpoint() -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 8192];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    port
}

#[test]
fn secrets_never_reach_logs_reports_or_errors() {
    let work = tempfile::tempdir().unwrap();
    let admin_secret = "sekrit-admin-4242424242424242";
    let worker_secret = "sekrit-worker-5353535353535353";
    let aws_secret = "sekrit-aws-6464646464646464";
    let endpoint_password = "sekrit-endpoint-7575757575";
    let endpoint = format!(
        "http://user:{endpoint_password}@127.0.0.1:{}",
        forbidding_endpoint()
    );
    let env = [
        ("SHARDPRESS_ADMIN_TOKEN", admin_secret),
        ("SHARDPRESS_WORKER_TOKEN", worker_secret),
        ("AWS_SECRET_ACCESS_KEY", aws_secret),
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
    ];
    let mut cluster = TestCluster::start_on("127.0.0.1:0", &["--lease-ttl-secs", "5"], &env);
    cluster.add_worker_with_env("w1", &[], &[("SHARDPRESS_TOKEN", worker_secret)]);
    let model = work.path().join("model");
    gen_model(&model, "2MB", "bf16", 1);
    let out = work.path().join("out");
    let mut outputs = Vec::new();
    let done = cluster
        .compress_command(&model, &out, "int8")
        .env("SHARDPRESS_TOKEN", admin_secret)
        .output()
        .unwrap();
    assert_success(&done, "job");
    outputs.push(text(&done));
    // Failures that involve the secrets: a wrong token; an S3 endpoint with a password that
    // refuses the coordinator and a client's `inspect`.
    outputs.push(text(&run(
        &cluster,
        &["jobs"],
        Some("sekrit-wrong-0000000000"),
    )));
    let s3 = cluster
        .compress_command(
            Path::new("s3://bucket/model"),
            &work.path().join("o2"),
            "int8",
        )
        .env("SHARDPRESS_TOKEN", admin_secret)
        .output()
        .unwrap();
    assert_eq!(s3.status.code(), Some(3), "{}", text(&s3));
    outputs.push(text(&s3));
    let inspect = Command::new(BIN)
        .args(["inspect", "s3://bucket/model"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!inspect.status.success());
    assert!(text(&inspect).contains("user:***@"), "{}", text(&inspect));
    outputs.push(text(&inspect));

    let mut written = outputs.join("\n");
    for file in files_under(cluster.dir.path())
        .into_iter()
        .map(|f| cluster.dir.path().join(f))
        .chain(files_under(&out).into_iter().map(|f| out.join(f)))
    {
        written.push_str(&String::from_utf8_lossy(&std::fs::read(&file).unwrap()));
    }
    assert!(written.contains("task leased"), "the logs were not read");
    for secret in [
        admin_secret,
        worker_secret,
        aws_secret,
        endpoint_password,
        "sekrit-wrong",
    ] {
        assert!(
            !written.contains(secret),
            "{secret} was written:\n{written}"
        );
    }
}
