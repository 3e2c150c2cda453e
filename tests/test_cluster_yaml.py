"""cluster.yaml and the cluster jobs, checked offline: Ray's own schema validation, token auth,
a dashboard kept off the network, shared storage in one bucket, an autoscaling GPU node type, a
head that trains nothing, and cluster jobs whose workers the autoscaler can place.
No Ray is started and no cloud is reached (`ray up` itself needs boto3 and AWS)."""

import copy
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

from raygpt.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
JOBS = ROOT / "jobs"
TOKEN_PATH = "~/.ray/auth_token"  # where every Ray process looks for the token by default
S3_URI = re.compile(r"s3://([A-Za-z0-9.\-_]+)(/[^\s'\"]*)?")


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _head(cluster: dict) -> dict:
    return cluster["available_node_types"][cluster["head_node_type"]]


def _gpu_types(cluster: dict) -> dict[str, dict]:
    return {name: t for name, t in cluster["available_node_types"].items()
            if name != cluster["head_node_type"] and t.get("resources", {}).get("GPU", 0) >= 1}


def _ray_start(commands: list[str]) -> str:
    """The one start command that runs `ray start` (the other may be `ray stop`)."""
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 1, f"expected one `ray start` command, got {starts}"
    return starts[0]


def _flags(command: str) -> dict[str, str]:
    """`--key=value` and `--key value` options of the `ray start` part of a shell command."""
    words = shlex.split(command[command.index("ray start"):].replace(";", " ; "))
    flags = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            key, eq, value = word.partition("=")
            if not eq and i + 1 < len(words) and not words[i + 1].startswith("--"):
                value = words[i + 1]
            flags[key] = value
    return flags


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(k) + _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _cluster_jobs() -> list[Path]:
    """Configs in jobs/ meant for the cluster: training configs whose runs go to a storage URI."""
    found = []
    for path in sorted(JOBS.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        run = raw.get("run") if isinstance(raw, dict) else None
        if isinstance(run, dict) and "://" in str(run.get("storage_path", "")):
            found.append(path)
    return found


# --- Ray's schema ---------------------------------------------------------------------------


def test_ray_accepts_the_config_offline(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(copy.deepcopy(cluster))  # the file as written
    prepared = prepare_config(copy.deepcopy(cluster))  # as `ray up` fills it (reads aws/defaults.yaml only)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    # The launcher concatenates setup_commands before each node kind's own commands.
    assert prepared["worker_setup_commands"][: len(cluster["setup_commands"])] == cluster["setup_commands"]


@pytest.mark.parametrize("breakage", [
    lambda c: c.update(idle_timeout_minute=5),  # a misspelt top-level key
    lambda c: c.update(head_node_type="no.such.type"),
    lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_workers=c["max_workers"] + 1),
    lambda c: c["available_node_types"]["ray.worker.gpu"].update(resources={"GPU": 0.5}),  # ints only
    lambda c: c["available_node_types"]["ray.worker.gpu"].pop("node_config"),
], ids=["misspelt-key", "bad-head-type", "min-over-max", "fractional-resource", "no-node-config"])
def test_the_schema_check_catches_a_broken_config(cluster, breakage):
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster)
    breakage(broken)
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


# --- security: token auth on, dashboard off the network --------------------------------------


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_token_auth_is_on_where_ray_starts(cluster, key):
    command = _ray_start(cluster[key])
    mode = command.find("RAY_AUTH_MODE=token")
    assert mode != -1 and mode < command.index("ray start"), f"{key} must set RAY_AUTH_MODE=token before `ray start`"
    assert "export RAY_AUTH_MODE=token" in command or "RAY_AUTH_MODE=token ray start" in command


def test_the_token_is_mounted_on_every_node(cluster):
    mounts = cluster["file_mounts"]
    assert TOKEN_PATH in mounts, "the token must be copied to ~/.ray/auth_token on every node"
    assert Path(mounts[TOKEN_PATH]).expanduser() == Path(TOKEN_PATH).expanduser(), (
        "mount the token `ray get-auth-token --generate` wrote on this machine")
    # file_mounts (not head-only cluster_synced_files) reach worker nodes too; nothing disables it.
    assert TOKEN_PATH not in cluster.get("cluster_synced_files", [])


def test_dashboard_listens_on_the_head_loopback_only(cluster):
    flags = _flags(_ray_start(cluster["head_start_ray_commands"]))
    assert "--head" in flags
    assert flags.get("--dashboard-host") == "127.0.0.1", "the dashboard on the head's loopback (reached over SSH)"
    assert flags.get("--include-dashboard", "true").lower() != "false", "Tune needs the dashboard (State API)"
    everything = "\n".join(_strings(cluster))
    assert "0.0.0.0" not in everything, "nothing may listen on, or be opened to, all addresses"
    for rule in cluster["provider"].get("security_group", {}).get("IpPermissions", []):
        port = int(flags.get("--dashboard-port", 8265))
        assert not rule.get("FromPort", 0) <= port <= rule.get("ToPort", -1), f"{port} opened by {rule}"


# --- shape: a head that trains nothing, autoscaling GPU nodes ---------------------------------


def test_head_offers_no_cpu_or_gpu_for_training(cluster):
    head = _head(cluster)
    assert head["resources"].get("CPU") == 0, "the head advertises no CPU: no worker or trial lands on it"
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0 and head.get("min_workers", 0) == 0
    # A hand-run head (the same start command) must not advertise its cores either.
    assert _flags(_ray_start(cluster["head_start_ray_commands"])).get("--num-cpus") == "0", "ray start --num-cpus=0"


def test_gpu_nodes_autoscale_from_zero(cluster):
    gpu = _gpu_types(cluster)
    assert gpu, "a worker node type with GPUs in its resources"
    for name, t in gpu.items():
        assert t.get("min_workers", 0) == 0, f"{name}: no idle GPU node kept"
        assert 1 <= t["max_workers"] <= cluster["max_workers"], name
        assert t["resources"].get("CPU", 0) >= 1, f"{name}: declare the CPUs too, so the autoscaler knows the shape"
        assert t["node_config"].get("InstanceType")
    assert 0 < cluster.get("idle_timeout_minutes", 0) <= 30, "set idle_timeout_minutes: idle GPU nodes go away"


def test_nodes_install_the_cuda_torch_then_raygpt_on_ray_2_60(cluster):
    setup = cluster["setup_commands"]
    torch = next(i for i, c in enumerate(setup) if "torch" in c and "pip install" in c)
    assert re.search(r"download\.pytorch\.org/whl/cu12\d", setup[torch]), f"not a CUDA 12 torch: {setup[torch]}"
    raygpt = next(i for i, c in enumerate(setup) if re.search(r"pip install .*(-e ~/raygpt|raygpt @)", c))
    assert torch < raygpt, "the CUDA torch first, so installing raygpt keeps it"
    assert any("ray[default,train,tune]==2.60" in c for c in setup)
    assert "2.60" in cluster["docker"]["image"] and "py311" in cluster["docker"]["image"]
    if "-e ~/raygpt" in setup[raygpt]:
        assert cluster["file_mounts"].get("~/raygpt") in (".", "./"), "mount the repository (ray up runs from its root)"
    assert any("boto3" in c for c in cluster["head_setup_commands"]), "the autoscaler needs boto3 on the head"


def test_every_node_has_an_instance_profile_for_the_bucket(cluster):
    for name, t in cluster["available_node_types"].items():
        profile = t["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Arn") or profile.get("Name"), f"{name}: no IamInstanceProfile, no S3 access"


def test_every_node_uses_our_security_group_not_rays_open_ssh_default(cluster):
    """Ray creates its default group (SSH from 0.0.0.0/0) for any node type without SecurityGroupIds."""
    for name, t in cluster["available_node_types"].items():
        assert t["node_config"].get("SecurityGroupIds"), f"{name}: Ray's default group would open SSH to the world"
    doc = (ROOT / "docs" / "cluster-aws.md").read_text()
    assert "FromPort=22,ToPort=22,IpRanges=[{CidrIp=$MY_CIDR}]" in doc and "0.0.0.0/0" not in doc


def _doc_policy(name: str) -> dict:
    import json
    import re

    doc = (ROOT / "docs" / "cluster-aws.md").read_text()
    block = re.search(rf"`{name}-policy.json`:\s*```json\n(.*?)```", doc, re.S)
    return json.loads(block.group(1))


def test_the_instance_profiles_are_least_privilege():
    head, worker = _doc_policy("raygpt-head"), _doc_policy("raygpt-worker")
    actions = {a for st in head["Statement"]
               for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert actions == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "ec2:RunInstances",
                       "ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:DescribeImages", "ec2:CreateTags",
                       "ec2:TerminateInstances", "iam:PassRole"}
    by_action = {a: st for st in head["Statement"]
                 for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert (by_action["ec2:TerminateInstances"]["Condition"]["StringEquals"]
            == {"ec2:ResourceTag/ray-cluster-name": "raygpt"})
    assert by_action["iam:PassRole"]["Resource"].endswith(":role/raygpt-worker")
    assert all(not a.startswith("ec2") for st in worker["Statement"] for a in
               ([st["Action"]] if isinstance(st["Action"], str) else st["Action"]))


# --- shared storage and the cluster jobs -------------------------------------------------------


def test_one_bucket_holds_data_and_runs(cluster):
    buckets = {m.group(1) for s in _strings(cluster) for m in S3_URI.finditer(s)}
    assert len(buckets) == 1, f"cluster.yaml should name one bucket, got {buckets}"
    (bucket,) = buckets
    jobs = _cluster_jobs()
    assert JOBS / "gpt2-small.yaml" in jobs
    for path in jobs:
        cfg = load_config(path, [])
        for key, value in (("run.storage_path", cfg.run.storage_path), ("data.dir", cfg.data.dir)):
            match = S3_URI.fullmatch(value)
            assert match and match.group(1) == bucket, f"{path.name}: {key}={value!r} is not on s3://{bucket}"


@pytest.mark.parametrize("path", _cluster_jobs(), ids=lambda p: p.name)
def test_cluster_job_fits_the_gpu_nodes(cluster, path):
    cfg = load_config(path, [])
    r = cfg.run
    assert r.use_gpu, f"{path.name}: a cluster job trains on the GPUs"
    gpus = getattr(r, "gpus_per_worker", 1.0)

    def placeable(t: dict) -> int:  # workers that fit on max_workers nodes of this type
        res = t["resources"]
        per_node = min(math.floor(res["GPU"] / gpus + 1e-9), math.floor(res["CPU"] / r.cpus_per_worker + 1e-9))
        return per_node * t["max_workers"]

    name, node = max(_gpu_types(cluster).items(), key=lambda item: placeable(item[1]))
    res, nodes = node["resources"], node["max_workers"]
    assert r.cpus_per_worker <= res["CPU"] and gpus <= res["GPU"], f"{path.name}: one worker fits no {name} node"
    assert r.num_workers * gpus <= nodes * res["GPU"], f"{path.name}: more GPUs than {nodes} x {name}"
    assert r.num_workers * r.cpus_per_worker <= nodes * res["CPU"], f"{path.name}: more CPUs than {nodes} x {name}"
    assert r.num_workers <= placeable(node), (
        f"{path.name}: {r.num_workers} workers of {r.cpus_per_worker} CPU / {gpus} GPU, but only "
        f"{placeable(node)} fit on {nodes} {name} nodes of {res}")
    assert r.resource_wait_s >= 300, f"{path.name}: give the autoscaler minutes to add a GPU node"


def test_runtime_env_ships_the_code_but_not_data_or_environments():
    from ray._private.runtime_env.packaging import _get_excludes
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env_vars values must be strings"
    assert env["env_vars"].get("RAY_TRAIN_V2_ENABLED") == "1"
    excluded = _get_excludes(ROOT, env["excludes"])
    for path in ["data", "data/stdlib/manifest.json", "runs", ".venv", ".venv/bin/python", ".git",
                 "raygpt/__pycache__", "raygpt.egg-info"]:
        assert excluded(ROOT / path), f"{path} would be uploaded with every job"
    for path in ["raygpt/data.py", "raygpt/train.py", "raygpt/assets/gpt2.tiktoken", "jobs/pretrain.py",
                 "jobs/tune.py", "jobs/gpt2-small.yaml", "pyproject.toml"]:
        assert not excluded(ROOT / path), f"{path} is needed by the job but excluded"


def test_every_node_gets_the_torch_version_the_project_tests(cluster):
    # A range would let a node the autoscaler adds later install another torch than the first ones.
    tested = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text())[1]
    setup = next(c for c in cluster["setup_commands"] if "torch" in c and "pip install" in c)
    assert re.search(r"\btorch==([0-9.]+)\b", setup) and f"torch=={tested}" in setup, setup
