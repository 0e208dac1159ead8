"""clusters/: every manifest and launcher YAML parses and passes a schema check, and
pipelines/core/storage.py works on real filesystems (local and an fsspec one).

KubeRay has no Python validator here, so the RayCluster/RayJob fields we use are described
below (KUBERAY_SCHEMA, from the ray.io/v1 CRDs) and the manifests may use only those. Launcher
YAMLs go through Ray's own schema (ray-schema.json via validate_config)."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
RAY_VERSION = importlib.metadata.version("ray")
IMAGE_IN_DOCKERFILE = "/home/ray/flowar"  # WORKDIR of clusters/Dockerfile

# ---------------------------------------------------------------------------- schema language
# dict: a mapping with exactly these optional keys; [x]: a list of x; str/int/bool: a leaf;
# MAP_STR: a free mapping of string values (Kubernetes map[string]string); ANY: not checked.
ANY = object()
MAP_STR = object()
QUANTITY = (str, int)


def check(obj, schema, path="") -> list[str]:
    if schema is ANY:
        return []
    if schema is MAP_STR:
        if not isinstance(obj, dict):
            return [f"{path}: expected a mapping"]
        return [f"{path}.{k}: value {v!r} must be a string" for k, v in obj.items() if not isinstance(v, str)]
    if isinstance(schema, dict):
        if not isinstance(obj, dict):
            return [f"{path}: expected a mapping, got {type(obj).__name__}"]
        errors = [f"{path}.{k}: unknown field" for k in obj if k not in schema]
        for k, v in obj.items():
            if k in schema:
                errors += check(v, schema[k], f"{path}.{k}")
        return errors
    if isinstance(schema, list):
        if not isinstance(obj, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(obj) for e in check(item, schema[0], f"{path}[{i}]")]
    types = schema if isinstance(schema, tuple) else (schema,)
    if bool in types or not isinstance(obj, bool):
        if isinstance(obj, types):
            return []
    return [f"{path}: expected {'/'.join(t.__name__ for t in types)}, got {obj!r}"]


ENV = [{"name": str, "value": str, "valueFrom": {
    "secretKeyRef": {"name": str, "key": str}, "configMapKeyRef": {"name": str, "key": str},
    "fieldRef": {"fieldPath": str}}}]
RESOURCES = {"requests": {"cpu": QUANTITY, "memory": QUANTITY, "nvidia.com/gpu": QUANTITY},
             "limits": {"cpu": QUANTITY, "memory": QUANTITY, "nvidia.com/gpu": QUANTITY}}
PROBE = {"httpGet": {"path": str, "port": (int, str)}, "exec": {"command": [str]},
         "tcpSocket": {"port": (int, str)}, "periodSeconds": int, "initialDelaySeconds": int,
         "timeoutSeconds": int, "failureThreshold": int}
CONTAINER = {
    "name": str, "image": str, "imagePullPolicy": str, "command": [str], "args": [str],
    "env": ENV, "ports": [{"name": str, "containerPort": int, "protocol": str}],
    "resources": RESOURCES, "volumeMounts": [{"name": str, "mountPath": str, "subPath": str,
                                              "readOnly": bool}],
    "lifecycle": {"preStop": {"exec": {"command": [str]}}},
    "readinessProbe": PROBE, "livenessProbe": PROBE, "workingDir": str,
}
POD_SPEC = {
    "containers": [CONTAINER], "initContainers": [CONTAINER], "restartPolicy": str,
    "volumes": [{"name": str, "persistentVolumeClaim": {"claimName": str, "readOnly": bool},
                 "emptyDir": {"medium": str, "sizeLimit": QUANTITY}, "secret": {"secretName": str},
                 "configMap": {"name": str}}],
    "tolerations": [{"key": str, "operator": str, "value": str, "effect": str}],
    "nodeSelector": MAP_STR, "serviceAccountName": str, "affinity": ANY,
}
POD_TEMPLATE = {"metadata": {"labels": MAP_STR, "annotations": MAP_STR}, "spec": POD_SPEC}
METADATA = {"name": str, "namespace": str, "labels": MAP_STR, "annotations": MAP_STR}

# The KubeRay ray.io/v1 CRD fields these manifests may use (RayCluster and RayJob specs).
RAY_CLUSTER_SPEC = {
    "rayVersion": str, "enableInTreeAutoscaling": bool, "suspend": bool,
    "autoscalerOptions": {"upscalingMode": str, "idleTimeoutSeconds": int, "resources": RESOURCES,
                          "image": str, "imagePullPolicy": str, "env": ENV},
    "headGroupSpec": {"serviceType": str, "enableIngress": bool, "rayStartParams": MAP_STR,
                      "template": POD_TEMPLATE},
    "workerGroupSpecs": [{"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int,
                          "idleTimeoutSeconds": int, "suspend": bool, "numOfHosts": int,
                          "rayStartParams": MAP_STR, "template": POD_TEMPLATE}],
}
RAY_JOB_SPEC = {
    "entrypoint": str, "runtimeEnvYAML": str, "jobId": str, "submissionMode": str,
    "entrypointNumCpus": (int, float), "entrypointNumGpus": (int, float),
    "entrypointResources": str, "shutdownAfterJobFinishes": bool, "ttlSecondsAfterFinished": int,
    "activeDeadlineSeconds": int, "backoffLimit": int, "suspend": bool,
    "rayClusterSpec": RAY_CLUSTER_SPEC, "clusterSelector": MAP_STR,
    "submitterPodTemplate": POD_TEMPLATE, "metadata": MAP_STR,
}
KUBERAY_SCHEMA = {
    "RayCluster": {"apiVersion": str, "kind": str, "metadata": METADATA, "spec": RAY_CLUSTER_SPEC},
    "RayJob": {"apiVersion": str, "kind": str, "metadata": METADATA, "spec": RAY_JOB_SPEC},
}
CORE_KINDS = {  # the plain Kubernetes objects beside them
    ("v1", "PersistentVolumeClaim"): {"apiVersion": str, "kind": str, "metadata": METADATA, "spec": {
        "accessModes": [str], "storageClassName": str,
        "resources": {"requests": {"storage": QUANTITY}}}},
    ("v1", "Service"): {"apiVersion": str, "kind": str, "metadata": METADATA, "spec": {
        "type": str, "selector": MAP_STR,
        "ports": [{"name": str, "port": int, "targetPort": (int, str), "protocol": str}]}},
    ("apps/v1", "Deployment"): {"apiVersion": str, "kind": str, "metadata": METADATA, "spec": {
        "replicas": int, "strategy": {"type": str}, "selector": {"matchLabels": MAP_STR},
        "template": POD_TEMPLATE}},
}


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for f in sorted((CLUSTERS / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc is not None:
                docs.append((f.name, doc))
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in manifests() if d["kind"] == kind]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    out = [(d["metadata"]["name"], d["spec"]) for d in by_kind("RayCluster")]
    out += [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in by_kind("RayJob")]
    return out


def ray_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def dockerfile_base() -> str:
    m = re.search(r"^FROM\s+(\S+)", (CLUSTERS / "Dockerfile").read_text(), re.M)
    return m.group(1)


def flowar_image() -> str:
    """The tag the manifests use for the Dockerfile's image: flowar:ray<ver>-<py>-<cuda>."""
    return "flowar:ray" + dockerfile_base().split(":", 1)[1]


# ---------------------------------------------------------------------------- the checker itself

def test_schema_checker_rejects_typos_and_wrong_types():
    spec = {"headGroupSpec": {"rayStartParams": {"num-cpus": 0}, "template": {"spec": {}}},
            "workerGroupSpecs": [{"groupName": "gpu", "replica": 1}]}
    errors = check(spec, RAY_CLUSTER_SPEC, "spec")
    assert "spec.headGroupSpec.rayStartParams.num-cpus: value 0 must be a string" in errors
    assert "spec.workerGroupSpecs[0].replica: unknown field" in errors
    assert check({"replicas": True}, {"replicas": int}) != []  # a bool is not an int


# ---------------------------------------------------------------------------- KubeRay manifests

def test_every_manifest_parses_and_uses_only_known_fields():
    docs = manifests()
    kinds = {d["kind"] for _, d in docs}
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim", "Deployment", "Service"} <= kinds
    for name, doc in docs:
        assert doc.get("metadata", {}).get("name"), f"{name}: {doc.get('kind')} has no metadata.name"
        if doc["kind"] in KUBERAY_SCHEMA:
            assert doc["apiVersion"] == "ray.io/v1", f"{name}: {doc['kind']} must be ray.io/v1"
            schema = KUBERAY_SCHEMA[doc["kind"]]
        else:
            schema = CORE_KINDS.get((doc["apiVersion"], doc["kind"]))
            assert schema, f"{name}: unexpected {doc['apiVersion']} {doc['kind']}"
        assert check(doc, schema, f"{name}:{doc['kind']}") == []


def test_ray_clusters_head_idle_gpu_workers_and_matching_images():
    for name, spec in ray_cluster_specs():
        assert spec["rayVersion"] == RAY_VERSION, f"{name}: the cluster must run the laptop's Ray"
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", f"{name}: the head must not run tasks"
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                             for c in g["template"]["spec"]["containers"])]
        assert gpu_groups, f"{name}: no GPU worker group"
        for g in spec["workerGroupSpecs"]:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        for g in gpu_groups:
            for c in g["template"]["spec"]["containers"]:
                res = c["resources"]
                # Kubernetes: extended resources need requests == limits.
                assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] >= 1
            tolerations = g["template"]["spec"].get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), g["groupName"]
        names = [g["groupName"] for g in spec["workerGroupSpecs"]]
        assert len(names) == len(set(names))
        for c in ray_containers(spec):
            assert c["image"] == flowar_image(), f"{name}/{c['name']}: image {c['image']}"


def test_dockerfile_builds_on_the_official_ray_image_with_this_package():
    base = dockerfile_base()
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+-cu\d+", base), base
    text = (CLUSTERS / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_IN_DOCKERFILE}" in text
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s+\S+$", text, re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    assert "pip install --no-cache-dir --no-deps -e ." in text
    ignore = (CLUSTERS / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*" and "!.venv" not in ignore  # the venv never ships


def test_shared_storage_and_mlflow_reachable_from_every_ray_pod():
    pvcs = {d["metadata"]["name"]: d for d in by_kind("PersistentVolumeClaim")}
    services = {d["metadata"]["name"]: d for d in by_kind("Service")}
    for name, spec in ray_cluster_specs():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                      for v in pod["volumes"] if "persistentVolumeClaim" in v}
            for c in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                claim = claims[mounts["/mnt/cluster_storage"]]
                assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"], claim
                env = {e["name"]: e for e in c["env"]}
                uri = env["MLFLOW_TRACKING_URI"]["value"]
                host, port = re.fullmatch(r"http://([\w-]+):(\d+)", uri).groups()
                assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]], uri
                # outputs a submitted job is not given land on the shared volume, not in the
                # job's working dir (pipelines/submit/job.py reads this from a job driver)
                assert env["FLOWAR_HOME"]["value"].startswith("/mnt/cluster_storage/"), name
                assert env["RAY_AUTH_MODE"]["value"] == "token"
                assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "flowar-ray-token"


def test_mlflow_server_has_a_database_and_an_artifact_store():
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    services = {d["metadata"]["name"]: d for d in by_kind("Service")}
    for svc in services.values():  # every Service selects a Deployment and a real container port
        dep = next(d for d in deployments.values()
                   if d["spec"]["template"]["metadata"]["labels"].items() >= svc["spec"]["selector"].items())
        ports = [p["containerPort"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c["ports"]]
        assert all(p["targetPort"] in ports for p in svc["spec"]["ports"]), svc["metadata"]["name"]
    for dep in deployments.values():
        assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    mlflow = deployments["flowar-mlflow"]["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), "") for a in mlflow["args"])
    db = re.fullmatch(r"postgresql://\w+:\$\(POSTGRES_PASSWORD\)@([\w-]+):(\d+)/\w+", args["backend-store-uri"])
    assert db and db.group(1) in services, args["backend-store-uri"]
    assert "serve-artifacts" in args and args["artifacts-destination"].startswith("/mnt/cluster_storage/")
    assert mlflow["image"] == flowar_image()


def test_nothing_is_exposed_beyond_the_cluster():
    for _, doc in manifests():
        assert doc["kind"] not in ("Ingress", "Route", "Gateway"), doc["kind"]
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
    for name, spec in ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        assert not head.get("enableIngress", False), name


def test_rayjob_runs_a_real_flowar_command_with_a_valid_config():
    from pipelines.submit.job import job_names

    for job in by_kind("RayJob"):
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode")
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert set(runtime_env) <= {"env_vars", "pip", "py_modules", "working_dir", "excludes"}
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "flowar" and argv[1] in job_names(), argv[:2]
        config = Path(argv[2].replace(IMAGE_IN_DOCKERFILE, str(ROOT)))
        assert config.is_file(), f"{argv[2]} is not in the image (repository)"
        if argv[1] == "train":  # the overrides name real config keys (unknown keys are errors)
            from pipelines.train.config import load_train_config
            cfg = load_train_config(config, argv[3:])
            assert cfg.ray.storage_path.startswith("/mnt/cluster_storage/")
        sub = spec["submitterPodTemplate"]["spec"]["containers"][0]
        assert {e["name"] for e in sub["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}


# ---------------------------------------------------------------------------- cluster launcher

@pytest.mark.parametrize("provider", ["aws", "gcp"])
def test_launcher_yaml_passes_rays_schema(provider):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTERS / "launcher" / f"{provider}.yaml").read_text())
    validate_config(prepare_config(raw))  # Ray's ray-schema.json, as `ray up` checks it
    assert raw["provider"]["type"] == provider and raw["cluster_name"]
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    assert types[raw["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] <= t["max_workers"] <= raw["max_workers"] for t in gpu)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+-cu\d+", raw["docker"]["image"])
    head = " ".join(raw["head_start_ray_commands"])
    worker = " ".join(raw["worker_start_ray_commands"])
    assert "--num-cpus=0" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    # Jobs log to the head's MLflow server. No FLOWAR_HOME: the nodes share no filesystem, so
    # flowar submit refuses outputs left at a FLOWAR_HOME default (names the key to give).
    assert "MLFLOW_TRACKING_URI=http://" in head and "MLFLOW_TRACKING_URI=http://" in worker
    assert "FLOWAR_HOME" not in head + worker
    mounts = raw["file_mounts"]
    assert (ROOT / mounts["/home/ray/flowar"]).resolve() == ROOT  # `ray up` runs from the repo root
    assert "pip install -q -e /home/ray/flowar" in " ".join(raw["setup_commands"])


def test_launcher_schema_check_can_fail():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTERS / "launcher" / "aws.yaml").read_text())
    raw["available_node_types"]["gpu"]["resourcez"] = {"GPU": 1}
    with pytest.raises(Exception, match="resourcez"):
        validate_config(prepare_config(raw))


def test_local_recipe_and_readme():
    script = CLUSTERS / "local" / "cluster.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--num-cpus=0" in text and "--dashboard-host=127.0.0.1" in text
    assert "\n    ray stop" not in text and '"$BIN/ray" stop' not in text  # never kill other clusters
    # every node inherits where jobs write from `ray start` (tests/test_submit.py runs a job)
    exported = text.index('export FLOWAR_HOME="$HOME_DIR" MLFLOW_TRACKING_URI="$TRACKING"')
    assert exported < text.index('"$BIN/ray" start --head')
    readme = (CLUSTERS / "README.md").read_text()
    for needle in ("kubectl port-forward svc/flowar-head-svc 8265:8265",
                   "kubectl port-forward svc/flowar-mlflow 5000:5000",
                   "kubectl create secret generic flowar-ray-token",
                   "kubectl create secret generic flowar-postgres", "flowar submit", "flowar jobs"):
        assert needle in readme, needle
    words = " ".join(readme.replace("**", "").split())
    assert "for `flowar submit` a relative path means relative to the uploaded working directory" in words


# ---------------------------------------------------------------------------- storage helpers

def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_storage_round_trip_through_a_non_local_filesystem(tmp_path):
    from pipelines.core import storage

    src = tmp_path / "ckpt"
    (src / "model").mkdir(parents=True)
    (src / "model" / "weights.safetensors").write_bytes(bytes(range(256)) * 40)
    (src / "config.json").write_text('{"a": 1}')
    uri = f"memory://flowar-test-{tmp_path.name}/runs/r1"  # fsspec's in-memory store, a real non-local fs
    assert storage.is_uri(uri) and not storage.exists(uri)
    storage.upload_dir(src, uri)
    assert storage.exists(storage.join(uri, "model", "weights.safetensors"))
    assert not storage.exists(storage.join(uri, "missing.json"))
    back = storage.download_dir(uri, tmp_path / "back")
    assert _tree(back) == _tree(src)
    with storage.local_dir(uri) as d:
        assert _tree(d) == _tree(src)
        kept = d
    assert not kept.exists()  # the temporary download is removed


def test_storage_local_paths_and_uris(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from pipelines.core import storage

    fs, path = storage.resolve(f"file://{tmp_path}")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)
    storage.makedirs(tmp_path / "a" / "b")
    assert storage.exists(tmp_path / "a" / "b") and storage.display("rel") == str(Path("rel").resolve())
    with storage.local_dir(tmp_path) as d:
        assert d == tmp_path  # local paths are used in place
    assert storage.join("s3://bucket/x/", "ckpt", "/step_1") == "s3://bucket/x/ckpt/step_1"
    assert storage.join("gs://b", "y") == "gs://b/y"
    monkeypatch.setenv("AWS_REGION", "eu-west-1")  # known region: no network lookup
    fs, path = storage.resolve("s3://bucket/datasets/latents/")
    assert isinstance(fs, pafs.S3FileSystem) and fs.region == "eu-west-1" and path == "bucket/datasets/latents"
    fs, path = storage.resolve("gs://bucket/ckpt")
    assert type(fs).__name__ == "GcsFileSystem" and path == "bucket/ckpt"
    with pytest.raises(ValueError, match="not supported"):
        storage.resolve("nosuchscheme://x/y")
    with pytest.raises(ValueError, match="empty"):
        storage.resolve("")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        storage.upload_dir(tmp_path / "missing", tmp_path / "dst")


def test_jobs_log_to_the_mlflow_server_the_pods_name(monkeypatch, tmp_path):
    """Ray pods set MLFLOW_TRACKING_URI (the cluster's server); a job config that names no
    store uses it, else the local SQLite store."""
    from pipelines.core.config import MLflowConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FLOWAR_HOME", str(tmp_path))
    assert MLflowConfig().resolved_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://flowar-mlflow:5000")
    assert MLflowConfig().resolved_uri() == "http://flowar-mlflow:5000"
    assert MLflowConfig(tracking_uri="sqlite:////x.db").resolved_uri() == "sqlite:////x.db"
