"""The launch files of cluster/ and `recllm submit`. Fast tests: every manifest parses and carries what its tool
reads, the shell scripts parse, the submission is exactly what --dry-run prints and a bad config never leaves the
laptop. Integration tests: cluster/start_ray_cluster.sh brings up a head and a worker node on this machine, the
demo pipeline runs through the Ray Jobs API on it, a failing job fails the command, and the SLURM script runs
on one node with stand-ins for srun and scontrol; every Ray process started here is stopped again."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from launcher.cli import main
from launcher.config import load_config
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
START_SCRIPT = CLUSTER / "start_ray_cluster.sh"
VENV_BIN = Path(sys.executable).parent
FAST_DEMO = ["train.max_steps=5", "train.eval_users=200", "train.seq_len=128", "samples.max_samples_per_task=200",
             "baseline.epochs=2", "infer.num_beams=5", "infer.top_k=5", "eval.ks=[1,5]",
             "text.vectors=false"]  # the submission path is under test; the text pass has its own tests


def _yaml(relative: str) -> dict:
    return yaml.safe_load((REPO / relative).read_text())


def _ray_pin() -> str:
    (line,) = [l for l in (REPO / "requirements.txt").read_text().splitlines() if l.startswith("ray[")]
    return line.split("==")[1]


def _fake_checkpoint(folder: Path) -> Path:
    """A folder that passes model.checkpoint's check: the LLaMA-2-7B config.json the manifests name, no weights."""
    from trainers.models import LLAMA2_7B

    folder.mkdir(parents=True, exist_ok=True)
    LLAMA2_7B.llama_config().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- manifests


def test_autoscaler_yaml_has_what_ray_up_needs():
    cfg = _yaml("cluster/autoscaler/aws-gpu.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers", "auth"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = {name: t["node_config"]["InstanceType"] for name, t in types.items() if name != cfg["head_node_type"]}
    assert set(gpu_types.values()) == {"p4d.24xlarge", "p5.48xlarge"}  # both 8-GPU instance types
    assert sum(types[name]["max_workers"] for name in gpu_types) <= cfg["max_workers"]
    assert any("requirements.txt" in c for c in cfg["setup_commands"]) and "torch==2.13.0" in cfg["setup_commands"][0]
    assert (REPO / cfg["file_mounts"]["/home/ray/recllm-requirements.txt"]).is_file()
    assert any("--head" in c for c in cfg["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])
    # Token auth on every node, from the token file copied to each; the dashboard only on the head's loopback.
    token = "/home/ray/.ray/auth_token"
    assert cfg["file_mounts"][token] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cfg[key] if "ray start" in c]
        assert f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token} ray start" in start, start
    assert "--dashboard-host=127.0.0.1" in cfg["head_start_ray_commands"][-1]


def test_docker_image_pins_the_ray_of_requirements():
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_ray_pin()}-" in text
    assert "-r requirements.txt" in text and "torch==2.13.0" in text


def test_kuberay_raycluster_has_a_head_and_8_gpu_workers():
    rc = _yaml("cluster/kubernetes/raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    spec = rc["spec"]
    assert spec["rayVersion"] == _ray_pin()
    assert spec["authOptions"] == {"mode": "token"}  # KubeRay makes the token Secret and sets it on every container
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= ports
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "/dev/shm" in {m["mountPath"] for m in worker["volumeMounts"]}


def test_rayjob_runs_a_valid_pipeline_on_the_raycluster_spec(tmp_path):
    job = _yaml("cluster/kubernetes/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["rayClusterSpec"] == _yaml("cluster/kubernetes/raycluster.yaml")["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    command, stage, config, *overrides = shlex.split(job["spec"]["entrypoint"])
    assert (command, stage) == ("recllm", "pipeline") and config.startswith("configs/")
    # The checkpoint folder lives on the cluster's volume; everything else must validate here.
    overrides = [f"model.checkpoint={_fake_checkpoint(tmp_path / 'ckpt')}" if o.startswith("model.checkpoint=") else o
                 for o in overrides]
    cfg = load_config(str(REPO / config), overrides)
    assert "train" in cfg.stages and cfg.train.use_gpu
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"  # lets `recllm train` add its workers' env_vars


def test_nightly_cronjob_submits_the_nightly_config(capsys):
    cron = _yaml("cluster/kubernetes/nightly-cronjob.yaml")
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:3] == ["recllm", "submit", "configs/nightly.yaml"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "recllm", "key": "auth_token"}
    assert main([*command[1:], "--dry-run"]) == 0  # the same arguments validate and build a submission
    submission = json.loads(capsys.readouterr().out)
    assert submission["address"] == "http://recllm-head-svc:8265"  # KubeRay's service for RayCluster `recllm`
    assert submission["entrypoint"].startswith("python -m launcher.cli pipeline configs/nightly.yaml ")


def test_cron_line_runs_the_first_line_of_the_nightly_config():
    first_line = (REPO / "configs" / "nightly.yaml").read_text().splitlines()[0]
    assert first_line == "# recllm pipeline configs/nightly.yaml"
    cfg = load_config(str(REPO / "configs" / "nightly.yaml"))
    assert cfg.infer.mode == "nightly" and cfg.stages == ["prepare", "infer"]
    lines = [l for l in (CLUSTER / "nightly" / "recllm-nightly.cron").read_text().splitlines()
             if l.strip() and not l.startswith("#") and not re.match(r"^[A-Z_]+=", l)]
    (line,) = lines
    fields = line.split(None, 5)
    assert all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5]), fields
    assert "recllm pipeline configs/nightly.yaml" in fields[5] and "flock -n" in fields[5]


# ---------------------------------------------------------------- shell scripts


@pytest.mark.parametrize("script", ["start_ray_cluster.sh", "slurm/recllm.sbatch",
                                    "deepspeed/start_ray_from_hostfile.sh"])
def test_shell_script_parses(script):
    path = CLUSTER / script
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert os.access(path, os.X_OK)


def test_hostfile_puts_the_head_on_the_first_host():
    out = subprocess.run([str(CLUSTER / "deepspeed" / "start_ray_from_hostfile.sh"),
                          str(CLUSTER / "deepspeed" / "hostfile.example"), "--print", "--port", "6380"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    args = shlex.split(out.stdout)
    assert args[0].endswith("start_ray_cluster.sh")
    assert args[1:] == ["--head-ip", "gpu-node-1", "--worker-hosts", "gpu-node-2", "--port", "6380"]


def test_start_script_refuses_unknown_arguments():
    out = subprocess.run([str(START_SCRIPT), "--heads", "1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "unknown argument --heads" in out.stderr


# ---------------------------------------------------------------- recllm submit, without a cluster


def test_submit_dry_run_prints_the_exact_submission(capsys, tmp_path):
    # A closed port: a dry run must not even try to connect.
    argv = ["submit", "configs/demo.yaml", "--dry-run", "--address", "http://127.0.0.1:9",
            f"run_dir={tmp_path}/run", "train.max_steps=5"]
    assert main(argv) == 0
    job = json.loads(capsys.readouterr().out)
    assert set(job) == {"address", "entrypoint", "runtime_env", "metadata", "submission_id"}
    assert job["entrypoint"] == ("python -m launcher.cli pipeline configs/demo.yaml "
                                 f"run_dir={tmp_path}/run train.max_steps=5")
    env = job["runtime_env"]
    assert env["working_dir"] == str(REPO) and "pip" not in env
    assert {".venv", "runs", ".git", ".torch_extensions"} <= set(env["excludes"])
    assert env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    meta = job["metadata"]
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["recllm_command"] == "pipeline" and meta["recllm_config"] == "configs/demo.yaml"
    assert meta["recllm_run_dir"] == f"{tmp_path}/run" and re.fullmatch(r"[0-9a-f]{40}", meta["recllm_git_commit"])
    assert json.loads(meta["recllm_overrides"]) == [f"run_dir={tmp_path}/run", "train.max_steps=5"]


def test_submit_pins_requirements_only_when_asked(capsys, tmp_path):
    assert main(["submit", "configs/demo.yaml", "--dry-run", "--stage", "infer", "--install-requirements",
                 "--env", "HF_HUB_OFFLINE=1", f"run_dir={tmp_path}"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["entrypoint"] == f"python -m launcher.cli infer configs/demo.yaml run_dir={tmp_path}"
    packages = job["runtime_env"]["pip"]["packages"]
    assert f"ray[default,data,train]=={_ray_pin()}" in packages and "torch==2.13.0" in packages
    assert all("==" in p and "#" not in p for p in packages)
    assert job["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_submit_rejects_a_bad_config_before_sending(capsys, tmp_path):
    base = ["submit", "configs/demo.yaml", "--address", "http://127.0.0.1:9"]
    assert main([*base, f"run_dir={tmp_path}", "infer.top_k=many"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recllm submit: error: configs/demo.yaml: infer.top_k") and len(err.splitlines()) == 1
    # Paths that would not survive the trip: every problem at once.
    assert main([*base, "--env", "NOVALUE", "data.path=../elsewhere"]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "--env 'NOVALUE'" in err and "run_dir: 'runs/demo' is relative" in err
    assert "data.path: '../elsewhere'" in err


def test_submit_to_no_cluster_fails_in_one_line(tmp_path):
    out = subprocess.run([str(VENV_BIN / "recllm"), "submit", "configs/demo.yaml", "--address", "http://127.0.0.1:9",
                          f"run_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("recllm submit: error: no Ray cluster answers at "
                                                          "http://127.0.0.1:9")


# ---------------------------------------------------------------- a real Ray cluster on this machine


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_base(nodes: int) -> int:
    """A base below Linux's ephemeral range whose per-node service ports (base + 1000k + 0..10) are free."""
    for _ in range(50):
        base = random.randrange(21000, 30000, 1000)
        if all(_port_is_free(base + 1000 * k + i) for k in range(nodes) for i in range(11)):
            return base
    raise RuntimeError("no free port block for the test cluster")


def _cluster_env(token_file: Path) -> dict:
    """The env of the script and its clients; the cluster token lives in ``token_file`` (made by the head), never
    in this machine's ~/.ray/auth_token."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PYTHONUNBUFFERED": "1", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))  # DeepSpeed's CPU ops, built once
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        env.pop(name, None)
    return env


def _live_members(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies waiting for a parent do not count)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def _processes_using(path: str) -> list[str]:
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in text:
            out.append(text[:120])
    return out


@pytest.fixture(scope="class")
def ray_cluster(tmp_path_factory):
    """Head (1 CPU, dashboard) + one worker node (1 CPU) on 127.0.0.1, started and stopped by the script."""
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    state_dir = tmp_path_factory.mktemp("ray_state")
    port, dashboard_port = _free_port(), _free_port()
    env = _cluster_env(tmp_path_factory.mktemp("ray_token") / "auth_token")
    pgids: dict[str, int] = {}
    try:
        start = subprocess.run(
            [str(START_SCRIPT), "--head-ip", "127.0.0.1", "--num-workers", "1", "--head-cpus", "1",
             "--worker-cpus", "1", "--port", str(port), "--dashboard-port", str(dashboard_port),
             "--dashboard-host", "127.0.0.1", "--port-base", str(_free_port_base(2)), "--temp-dir", temp_dir,
             "--state-dir", str(state_dir), "--timeout", "240"],
            env=env, capture_output=True, text=True, timeout=400)
        pgids = {p.stem: int(p.read_text()) for p in state_dir.glob("*.pid")}
        logs = "\n".join(p.read_text()[-3000:] for p in state_dir.glob("*.log"))
        assert start.returncode == 0, start.stderr + logs
        yield SimpleNamespace(address=f"http://127.0.0.1:{dashboard_port}", gcs=f"127.0.0.1:{port}", env=env,
                              pgids=pgids)
    finally:
        pgids = pgids or {p.stem: int(p.read_text()) for p in state_dir.glob("*.pid")}
        stop = subprocess.run([str(START_SCRIPT), "--stop", "--state-dir", str(state_dir)], env=env,
                              capture_output=True, text=True, timeout=180)
        shutil.rmtree(temp_dir, ignore_errors=True)
    # Reached only when the tests ran: --stop left no process of either node behind.
    assert stop.returncode == 0, stop.stderr
    assert not list(state_dir.glob("*.pid"))
    assert {name: _live_members(pgid) for name, pgid in pgids.items()} == {name: [] for name in pgids}


def _auth_env(env: dict) -> dict:
    """The env in which Ray's CLI talks to a cluster that has token auth on (as `recllm submit` sets it)."""
    return {**env, "RAY_AUTH_MODE": "token"}


def _submit(cluster, *args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "recllm"), "submit", "configs/demo.yaml", "--address", cluster.address,
                           *args], cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=timeout)


def _job_status(cluster, job_id: str) -> str:
    """What the cluster's Jobs API says, asked from a fresh process (as any other client would)."""
    code = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    out = subprocess.run([sys.executable, "-c", code, cluster.address, job_id], env=_auth_env(cluster.env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _job_id(stdout: str) -> str:
    match = re.search(r"recllm submit: job (\S+) submitted to", stdout)
    assert match, stdout[-2000:]
    return match.group(1)


@pytest.mark.integration
class TestLocalRayCluster:
    def test_start_script_runs_a_head_and_a_worker_node(self, ray_cluster):
        out = subprocess.run([str(VENV_BIN / "ray"), "list", "nodes", "--address", ray_cluster.address,
                              "--format", "json", "--filter", "state=ALIVE"],
                             env=_auth_env(ray_cluster.env), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        nodes = json.loads(out.stdout)
        assert sorted(n["is_head_node"] for n in nodes) == [False, True]
        assert len({n["node_id"] for n in nodes}) == 2
        assert all(n["resources_total"]["CPU"] == 1 for n in nodes)
        assert set(ray_cluster.pgids) == {"head", "worker-1"}

    def test_submit_runs_the_demo_pipeline_through_ray_jobs(self, ray_cluster, tmp_path):
        run_dir = tmp_path / "run"
        out = _submit(ray_cluster, f"run_dir={run_dir}", *FAST_DEMO, timeout=1500)
        job_id = _job_id(out.stdout)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        assert out.stdout.rstrip().endswith(f"job {job_id} SUCCEEDED")
        assert "stage evaluate" in out.stdout  # the job's logs were streamed here
        assert _job_status(ray_cluster, job_id) == "SUCCEEDED"
        metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
        assert set(metrics["models"]) == {"recllm", "popular", "sasrec", "content"} and metrics["split"] == "test"
        topk = json.loads((run_dir / "topk" / "_SUCCESS").read_text())
        assert topk["users"] == 8317 and topk["top_k"] == 5

    def test_submit_exits_non_zero_when_the_job_fails(self, ray_cluster, tmp_path):
        # train needs build-ids and build-samples first: the job fails on the cluster, the command with it.
        out = _submit(ray_cluster, "--stage", "train", f"run_dir={tmp_path / 'empty'}", timeout=600)
        job_id = _job_id(out.stdout)
        assert out.returncode == 1, out.stdout[-3000:]
        assert out.stdout.rstrip().endswith(f"job {job_id} FAILED")
        assert _job_status(ray_cluster, job_id) == "FAILED"
        assert "run `recllm build-ids` first" in out.stdout


@pytest.mark.integration
def test_slurm_script_on_one_node(tmp_path):
    """recllm.sbatch end to end on a one-node 'allocation': srun and scontrol are stand-ins that run the command
    here; the script starts Ray through start_ray_cluster.sh, waits, submits the config, and stops Ray on exit."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text('#!/bin/bash\n# srun on one machine: drop its options, run the command\n'
                                   'while [[ $1 == -* ]]; do case $1 in -w|-N|-n) shift 2 ;; *) shift ;; esac; done\n'
                                   'exec "$@"\n')
    (fake_bin / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    for tool in ("srun", "scontrol"):
        (fake_bin / tool).chmod(0o755)
    job_id = f"t{uuid.uuid4().hex[:8]}"
    cluster_env = _cluster_env(tmp_path / "auth_token")
    env = {**cluster_env, "PATH": f"{fake_bin}{os.pathsep}{cluster_env['PATH']}", "SLURM_JOB_ID": job_id,
           "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(REPO), "RECLLM_VENV": str(VENV_BIN.parent),
           "RECLLM_SUBMIT": "1", "RAY_PORT": str(_free_port()), "RAY_DASHBOARD_PORT": str(_free_port()),
           "RAY_PORT_BASE": str(_free_port_base(1))}
    run_dir = tmp_path / "run"
    try:
        out = subprocess.run(["bash", str(CLUSTER / "slurm" / "recllm.sbatch"), "configs/demo.yaml",
                              f"run_dir={run_dir}", "stages=[prepare]"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "Ray cluster of 1 nodes up" in out.stdout and "SUCCEEDED" in out.stdout
        assert json.loads((run_dir / "dataset" / "manifest.json").read_text())["counts"]["users"] == 8317
        assert "stopped head" in out.stderr
        assert _processes_using(f"/tmp/ray-{job_id}") == []
    finally:
        state_dir = Path(f"/tmp/recllm-ray-{job_id}")
        if list(state_dir.glob("*.pid")):  # the script failed before its own cleanup: stop what it started
            subprocess.run([str(START_SCRIPT), "--stop", "--state-dir", str(state_dir)], env=env, timeout=180)
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(f"/tmp/ray-{job_id}", ignore_errors=True)
