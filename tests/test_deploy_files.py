"""Deployment files: the Ray cluster config, the KubeRay RayJob and CronJob, docs/running-at-scale.md.

None of them can be exercised here (no cloud, no Kubernetes), so these tests check what can be checked
offline: Ray's own schema and config preparation, the manifests' structure and cross-references, the
entrypoint against the real CLI parser, the CronJob's shell script syntax, and that every config
path the files mention exists.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "ray_cluster.yaml"
RAYJOB = ROOT / "deploy" / "kuberay-rayjob.yaml"
CRONJOB = ROOT / "deploy" / "kuberay-cronjob.yaml"
DOC = ROOT / "docs" / "running-at-scale.md"
DEPLOY_FILES = [CLUSTER, RAYJOB, CRONJOB, DOC]
S3_CONFIG = ROOT / "configs" / "llava-1.5-7b-s3.yaml"
IMAGE_ROOT = "/home/ray/vlm-batch/"  # where the RayJob's image holds the repository
CONFIG_PATH = re.compile(r"configs/[A-Za-z0-9._-]+\.ya?ml")


def load(path: Path):
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def compute_of(config_path: Path) -> dict:
    return load(config_path)["compute"]


# ---------------------------------------------------------------- ray_cluster.yaml


def test_cluster_config_matches_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load(CLUSTER), schema)


def test_cluster_config_passes_rays_own_preparation():
    """What `ray up` does before touching AWS: fill defaults, merge setup commands, validate."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    if not hasattr(util, "prepare_config") or not hasattr(util, "validate_config"):
        pytest.skip("this Ray has no prepare_config/validate_config")
    prepared = util.prepare_config(load(CLUSTER))
    util.validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_cluster_node_types():
    config = load(CLUSTER)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head runs the driver, not decode or inference tasks"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    cpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) == 0}
    assert gpu and cpu, "needs a GPU group for the actors and a CPU group for decoding"
    for t in workers.values():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, "worker groups autoscale from zero"
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
        assert t["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] >= 100
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    # The S3 config's actor pool fits in what the GPU groups can grow to.
    compute = compute_of(S3_CONFIG)
    gpus = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu.values())
    assert compute["actors"] * compute["gpus_per_actor"] <= gpus


def test_cluster_placeholders_are_marked():
    config = load(CLUSTER)
    for t in config["available_node_types"].values():
        assert "REPLACE-ME" in t["node_config"]["ImageId"]
        assert "REPLACE-ME" in t["node_config"]["IamInstanceProfile"]["Arn"]


def test_cluster_setup_installs_the_project():
    config = load(CLUSTER)
    assert config["file_mounts"] == {"~/vlm-batch": "."}
    assert ".gitignore" in config["rsync_filter"], "keeps .venv/ and demo_out/ off the nodes"
    setup = "\n".join(config["setup_commands"])
    assert "--python 3.11" in setup
    torch_line = next(c for c in config["setup_commands"] if "torch==" in c)
    # CUDA wheels only where a GPU answers, CPU wheels elsewhere, and torch before the project.
    assert "nvidia-smi" in torch_line and "whl/cu128" in torch_line and "whl/cpu" in torch_line
    install = next(i for i, c in enumerate(config["setup_commands"]) if "-e ~/vlm-batch" in c)
    assert config["setup_commands"].index(torch_line) < install
    assert any("boto3" in c for c in config["head_setup_commands"]), "the autoscaler needs boto3"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


def pinned_ray_version() -> str:
    setup = "\n".join(load(CLUSTER)["setup_commands"])
    match = re.search(r"ray\[[a-z,]+\]==([0-9.]+)", setup)
    assert match, "ray_cluster.yaml pins the cluster's Ray version"
    return match.group(1)


# ---------------------------------------------------------------- KubeRay RayJob


def rayjob() -> dict:
    docs = load_all(RAYJOB)
    assert len(docs) == 1, "the CronJob creates this file as-is: it must hold only the RayJob"
    return docs[0]


def test_rayjob_fields():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert "generateName" in job["metadata"] and "name" not in job["metadata"], "created repeatedly"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert isinstance(spec["submitterConfig"]["backoffLimit"], int)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert runtime_env["env_vars"]["AWS_DEFAULT_REGION"] == load(S3_CONFIG)["storage"]["region"]
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())


def test_rayjob_cluster_spec():
    cluster = rayjob()["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned_ray_version(), "RayJob and ray_cluster.yaml run the same Ray"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    images = {head["template"]["spec"]["containers"][0]["image"]}
    groups = cluster["workerGroupSpecs"]
    gpu_groups = []
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        images.add(container["image"])
        limits = container["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(group)
            assert int(limits["nvidia.com/gpu"]) >= 1
    assert gpu_groups, "a worker group with nvidia.com/gpu limits"
    assert len(images) == 1, "head and workers run one image"
    compute = compute_of(S3_CONFIG)
    gpus = sum(
        g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in gpu_groups
    )
    assert compute["actors"] * compute["gpus_per_actor"] <= gpus
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    assert {p.get("serviceAccountName") for p in pods} == {"vlm-batch-ray"}, "S3 access for every pod"


def entrypoint_argv() -> list[str]:
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert argv[:2] == ["python", IMAGE_ROOT + "jobs/caption.py"]
    return [a.replace(IMAGE_ROOT, str(ROOT) + "/") for a in argv[2:]]


def test_rayjob_entrypoint_is_a_valid_caption_command():
    """The entrypoint's arguments go through jobs/caption.py's own parser and config validation."""
    from pipeline import cli

    spec = importlib.util.spec_from_file_location("caption_cli", ROOT / "jobs" / "caption.py")
    caption = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(caption)
    assert caption.caption_main is cli.caption_main  # the script is pipeline.cli's caption command
    argv = entrypoint_argv()
    config, args = cli.parse_args(argv)
    assert Path(args.config).is_file()
    assert Path(args.config).resolve().parent == ROOT / "configs"
    config.require_paths()
    assert config.input.uri.startswith("s3://") and config.output.uri.startswith("s3://")
    assert config.model.device == "cuda"


# ---------------------------------------------------------------- CronJob


def test_cronjob_objects():
    docs = load_all(CRONJOB)
    assert all("apiVersion" in d and "kind" in d and d["metadata"].get("name") for d in docs)
    namespaces = {d["metadata"].get("namespace") for d in docs} | {rayjob()["metadata"].get("namespace")}
    assert len(namespaces) == 1 and None not in namespaces, "every object in one explicit namespace"

    cron = by_kind(docs, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid", "two runs must never overlap"
    assert len(spec["schedule"].split()) == 5
    job = spec["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] > rayjob()["spec"]["activeDeadlineSeconds"], "outlives its RayJob"
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")

    account = by_kind(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    role = by_kind(docs, "Role")
    rules = [r for r in role["rules"] if "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"]]
    assert rules and {"create", "get", "list", "delete"} <= set(rules[0]["verbs"])
    binding = by_kind(docs, "RoleBinding")
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["roleRef"] == role_ref
    subject = {"kind": "ServiceAccount", "name": account, "namespace": binding["metadata"]["namespace"]}
    assert subject in binding["subjects"]


def cron_container() -> tuple[dict, dict]:
    pod = by_kind(load_all(CRONJOB), "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod, pod["containers"][0]


def test_cronjob_creates_the_rayjob_file_from_its_configmap():
    pod, container = cron_container()
    script = container["args"][0]
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    key = volume["configMap"]["items"][0]
    assert key["key"] == "rayjob.yaml"
    created = f"{mount['mountPath']}/{key['path']}"
    assert f"kubectl create -f {created}" in script
    # The configmap is built from deploy/kuberay-rayjob.yaml by the command the header documents.
    assert f"configmap {volume['configMap']['name']}" in CRONJOB.read_text()
    assert "--from-file=rayjob.yaml=deploy/kuberay-rayjob.yaml" in CRONJOB.read_text()
    # The overlap guard selects the label the RayJob carries.
    env = {e["name"]: e["value"] for e in container["env"]}
    label, value = env["SELECTOR"].split("=")
    assert rayjob()["metadata"]["labels"][label] == value
    assert "Complete" in script and "Failed" in script


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
def test_cronjob_script_is_valid_shell():
    _, container = cron_container()
    assert container["command"][:2] == ["/bin/sh", "-c"]
    result = subprocess.run(["sh", "-n", "-c", container["args"][0]], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- cross-file references


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: p.name)
def test_mentioned_configs_exist(path):
    mentioned = set(CONFIG_PATH.findall(path.read_text()))
    missing = sorted(m for m in mentioned if not (ROOT / m).is_file())
    assert not missing, f"{path.name} mentions configs that do not exist: {missing}"


@pytest.mark.parametrize("path", [CLUSTER, RAYJOB, DOC], ids=lambda p: p.name)
def test_commands_name_the_job_and_a_config(path):
    text = path.read_text()
    assert "jobs/caption.py" in text and (ROOT / "jobs" / "caption.py").is_file()
    assert CONFIG_PATH.search(text), f"{path.name} shows a command with a config"


def test_doc_links_resolve():
    text = DOC.read_text()
    links = [m for m in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in m]
    assert links
    missing = [m for m in links if not (DOC.parent / m).exists()]
    assert not missing, missing


def test_doc_says_what_was_not_verified():
    text = DOC.read_text()
    assert "None of them has been run on AWS or on Kubernetes" in text
