"""cluster/ checked offline: the launcher config against Ray's own schema; every Kubernetes document strictly (an
unknown field is an error, as with `kubectl apply --validate=strict`): KubeRay's kinds against the CRDs of a pinned
KubeRay commit kept in tests/kuberay_crds/, Kubernetes' own kinds against kubernetes-validate's schemas; the
Dockerfile structurally; the job entrypoints they name parse."""

import functools
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import yaml

from ops.submit import check_args

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
PINNED = {re.split(r"[\[=]", d)[0]: d.split("==")[1]
          for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}


def load(name: str) -> list[dict]:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def test_the_aws_launcher_config_passes_rays_schema_and_runs_the_image_with_token_auth():
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = load("aws.yaml")
    validate_config(prepare_config(config))  # Ray's own ray-schema.json, after Ray fills in its defaults
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers only
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) and t["min_workers"] == 0 < t["max_workers"]
               for t in workers)
    assert config["docker"]["image"].endswith(":" + tomllib.loads((ROOT / "pyproject.toml").read_text())
                                              ["project"]["version"])
    assert "--gpus all" in config["docker"]["worker_run_options"]
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in commands)
    assert any(path.endswith("/.ray/auth_token") for path in config["file_mounts"])
    assert "AWS_SECRET_ACCESS_KEY" not in (CLUSTER / "aws.yaml").read_text()


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_manifests_token_and_s3_from_secrets_gpu_workers_and_one_cluster_spec():
    (cluster,) = load("kuberay/raycluster.yaml")
    (job,) = load("kuberay/rayjob.yaml")
    secrets = {s["metadata"]["name"]: set(s["stringData"]) for s in load("kuberay/secrets.example.yaml")}
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = cluster["spec"]
    assert spec["rayVersion"] == PINNED["ray"] and spec["enableInTreeAutoscaling"] is True
    assert job["spec"]["rayClusterSpec"] == spec  # the job's cluster is the same cluster
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in
           g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and gpu[0]["minReplicas"] == 0 < gpu[0]["maxReplicas"]
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    for container in containers(spec) + submitter:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets[ref["name"]]
        assert container["image"] == "REGISTRY/captioning:0.1.0"
    for container in containers(spec):
        env = {e["name"]: e for e in container["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env[name]["valueFrom"]["secretKeyRef"]  # from a Secret, never a literal value
            assert ref["key"] in secrets[ref["name"]]
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "jobs.batch"]
    check_args("batch", command[3:])  # the job's options parse as `captioning batch`'s


def test_the_dockerfile_installs_the_pinned_gpu_dependencies_and_every_package():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert "pip install --no-cache-dir '.[gpu]'" in text and "USER ray" in text and "wget" in text
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in packages:
        name = package.rstrip("*")
        assert f"COPY {name} ./{name}" in text, name


def test_the_dev_cluster_script_is_valid_bash_that_runs_the_tested_module():
    script = CLUSTER / "dev-cluster.sh"
    assert script.stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    assert "-m ops.devcluster" in script.read_text()
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "up" in done.stdout and "down" in done.stdout


def test_schedule_definitions_run_the_same_retrain_on_the_same_cron():
    from croniter import croniter

    (cron_job,) = load("schedule/raycronjob.yaml")
    (standalone,) = load("schedule/rayjob-retrain.yaml")
    k8s = {doc["kind"]: doc for doc in load("schedule/cronjob.yaml")}
    (cluster,) = load("kuberay/raycluster.yaml")
    assert (cron_job["apiVersion"], cron_job["kind"]) == ("ray.io/v1", "RayCronJob")
    spec = cron_job["spec"]
    assert "concurrencyPolicy" not in spec and spec["jobTemplate"]["rayClusterSpec"] == cluster["spec"]
    assert standalone["spec"] == spec["jobTemplate"]  # the CronJob's RayJob is the RayCronJob's template
    assert k8s["CronJob"]["spec"]["schedule"] == spec["schedule"] and croniter.is_valid(spec["schedule"])
    assert k8s["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"] == \
        k8s["ServiceAccount"]["metadata"]["name"] == k8s["RoleBinding"]["subjects"][0]["name"]
    assert {"create", "get", "list"} <= set(k8s["Role"]["rules"][0]["verbs"])
    script = k8s["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "app.kubernetes.io/name=captioning-retrain" in script
    assert standalone["metadata"]["labels"]["app.kubernetes.io/name"] == "captioning-retrain"
    command = shlex.split(spec["jobTemplate"]["entrypoint"])
    assert command[:3] == ["python", "-m", "jobs.retrain"]
    check_args("retrain", command[3:])
    line = next(x for x in (CLUSTER / "schedule/crontab").read_text().splitlines() if x and x[0].isdigit())
    fields = line.split()
    assert " ".join(fields[:5]) == spec["schedule"]
    submitted = shlex.split(line.split("captioning jobs submit retrain", 1)[1].split(">>")[0])
    check_args("retrain", submitted[submitted.index("--") + 1:])


CRDS = Path(__file__).resolve().parent / "kuberay_crds"
KUBERNETES = "1.34.0"  # the Kubernetes release whose schemas the native kinds are checked against


def strict(schema):
    """A CRD's OpenAPI schema with unknown fields refused wherever it names its fields (as the API server's strict
    field validation does), except where the CRD keeps unknown fields on purpose."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out and \
            not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schemas() -> dict:
    found = {}
    for path in sorted(CRDS.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 3 MB of YAML
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            found[key] = strict(version["schema"]["openAPIV3Schema"])
    return found


def problems(document: dict, schemas: dict) -> list[str]:
    """Why a Kubernetes document is not valid, strictly; [] when it is."""
    import jsonschema
    import kubernetes_validate

    key = (document.get("apiVersion"), document.get("kind"))
    if key in schemas:
        errors = jsonschema.Draft7Validator(schemas[key]).iter_errors(document)
        return [f"{'.'.join(map(str, e.absolute_path)) or 'top'}: {e.message}" for e in errors]
    try:
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'.'.join(map(str, err.path)) or 'top'}: {err.message}"]
    return []


def kubernetes_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(CLUSTER.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc:
                docs.append((f"{path.relative_to(CLUSTER)}:{doc['kind']}", doc))
    return docs


def test_every_kubernetes_document_in_cluster_is_valid_strictly():
    schemas = crd_schemas()
    assert {("ray.io/v1", kind) for kind in ("RayCluster", "RayJob", "RayCronJob")} <= set(schemas)
    documents = kubernetes_documents()
    kinds = {doc["kind"] for _, doc in documents}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Secret", "Role"} <= kinds
    for name, doc in documents:
        assert problems(doc, schemas) == [], name


def test_strict_validation_refuses_an_unknown_field_in_every_kind():
    import copy

    schemas = crd_schemas()
    for name, doc in kubernetes_documents():
        spoiled = copy.deepcopy(doc)
        (spoiled.get("spec") or spoiled.setdefault("metadata", {}))["notAField"] = "x"
        assert any("notAField" in p for p in problems(spoiled, schemas)), name
    (cron,) = [doc for name, doc in kubernetes_documents() if doc["kind"] == "RayCronJob"]
    forbidding = {**cron, "spec": {**cron["spec"], "concurrencyPolicy": "Forbid"}}
    assert any("concurrencyPolicy" in p for p in problems(forbidding, schemas))  # RayCronJob has no such policy


def test_the_crds_name_their_source_and_license():
    notice = (CRDS / "NOTICE").read_text()
    assert "ray-project/kuberay" in notice and "feeaf72fa" in notice and "Apache License" in notice
