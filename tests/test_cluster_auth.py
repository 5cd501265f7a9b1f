"""Secure by default: a cluster started by cluster/start_ray_cluster.sh refuses the Jobs API to a request without
its token and binds the dashboard to loopback; `recllm submit` sends the token, and refuses plain http to another
machine with no token. The cluster test starts a real head on 127.0.0.1 and always stops it."""

from __future__ import annotations

import json

import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster.job_submission import open_cluster_refusal
from launcher.cli import main
from tests.conftest import REPO
from tests.test_cluster_launch import (START_SCRIPT, VENV_BIN, _cluster_env, _free_port, _free_port_base,
                                       _live_members)


@pytest.mark.parametrize("address, has_token, refused", [
    ("http://10.0.0.1:8265", False, True),
    ("10.0.0.1:8265", False, True),             # JobSubmissionClient reads a bare host:port as http
    ("http://head.example.org:8265", False, True),
    ("http://10.0.0.1:8265", True, True),       # the bearer token would cross the network in clear (issue #27)
    ("http://head.example.org:8265", True, True),
    ("https://head.example.org:8265", True, False),
    ("http://127.0.0.1:8265", True, False),
    ("https://head.example.org:8265", False, False),
    ("http://127.0.0.1:8265", False, False),
    ("http://localhost:8265", False, False),
    ("http://[::1]:8265", False, False),
])
def test_plain_http_to_another_machine_needs_a_token(address, has_token, refused):
    assert (open_cluster_refusal(address, has_token) is not None) == refused


def test_submit_refuses_an_open_remote_cluster_in_one_line_unless_insecure(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no_token"))
    argv = ["submit", "configs/demo.yaml", f"run_dir={tmp_path}/run"]
    assert main([*argv, "--address", "http://10.0.0.1:8265"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recllm submit: error: refusing plain http to http://10.0.0.1:8265 "
                                               "without a cluster token")
    # --insecure lets it through: 0.0.0.0 is not loopback by name, yet reaches only this machine (nothing listens).
    port = _free_port()
    assert main([*argv, "--address", f"http://0.0.0.0:{port}", "--insecure"]) == 1
    assert "no Ray cluster answers" in capsys.readouterr().err


def test_submit_with_a_token_refuses_plain_http_and_dry_run_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-token-value")
    argv = ["submit", "configs/demo.yaml", f"run_dir={tmp_path}/run", "--address", "http://10.0.0.1:8265"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the cluster token would cross the network in clear" in err[0]
    assert "secret-token-value" not in err[0]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["address"] == "http://10.0.0.1:8265"
    assert "the real submit would be refused: refusing plain http to http://10.0.0.1:8265" in out.err
    assert main(["submit", "configs/demo.yaml", f"run_dir={tmp_path}/run", "--dry-run", "--address",
                 "https://head.example.org:8265"]) == 0
    assert "would be sent to https://head.example.org:8265 with the cluster token" in capsys.readouterr().err


def _listen_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) with a socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def _status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.integration
def test_cluster_needs_its_token_and_submit_sends_it(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rca-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    state_dir, token_file = tmp_path / "state", tmp_path / "token" / "auth_token"
    port, dashboard_port = _free_port(), _free_port()
    env = _cluster_env(token_file)  # no token anywhere yet: the script must make one
    common = ["--head-ip", "127.0.0.1", "--port", str(port), "--state-dir", str(state_dir), "--temp-dir", temp_dir]
    pgids: dict[str, int] = {}
    try:
        start = subprocess.run([str(START_SCRIPT), *common, "--head-cpus", "1", "--dashboard-port",
                                str(dashboard_port), "--port-base", str(_free_port_base(1)), "--timeout", "240"],
                               env=env, capture_output=True, text=True, timeout=300)
        pgids = {p.stem: int(p.read_text()) for p in state_dir.glob("*.pid")}
        assert start.returncode == 0, start.stderr + "".join(p.read_text()[-3000:] for p in state_dir.glob("*.log"))
        token = token_file.read_text()
        assert re.fullmatch(r"[0-9a-f]{64}", token) and token_file.stat().st_mode & 0o777 == 0o600
        assert f"new cluster token in {token_file}" in start.stderr
        assert _listen_addresses(dashboard_port) == {"0100007F"}  # 127.0.0.1 only, by default

        jobs = f"http://127.0.0.1:{dashboard_port}/api/jobs/"
        assert _status(jobs) == 401
        assert _status(jobs, "0" * 64) == 403
        assert _status(jobs, token) == 200

        # A worker without the token cannot join: it says so instead of starting a node.
        lost = subprocess.run([str(START_SCRIPT), *common, "--worker", "--state-dir", str(tmp_path / "w"),
                               "--timeout", "2"], env=_cluster_env(tmp_path / "missing"), capture_output=True,
                              text=True, timeout=60)
        assert lost.returncode == 1 and "no cluster token" in lost.stderr
        assert not list((tmp_path / "w").glob("*.pid"))

        address = f"http://127.0.0.1:{dashboard_port}"
        submit = [str(VENV_BIN / "recllm"), "submit", "configs/demo.yaml", "--address", address, "--stage", "prepare"]
        refused = subprocess.run([*submit, f"run_dir={tmp_path}/refused"], cwd=REPO, capture_output=True, text=True,
                                 env=_cluster_env(tmp_path / "missing"), timeout=120)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines()[-1] == (
            f"recllm submit: error: the Ray cluster at {address} needs a token and none was found; set RAY_AUTH_TOKEN "
            "or copy the head's token to ~/.ray/auth_token (README: Token auth)")

        run_dir = tmp_path / "run"
        out = subprocess.run([*submit, f"run_dir={run_dir}"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
        assert re.search(r"job \S+ SUCCEEDED$", out.stdout.rstrip())
        assert (run_dir / "dataset" / "manifest.json").is_file()
    finally:
        pgids = pgids or {p.stem: int(p.read_text()) for p in state_dir.glob("*.pid")}
        stop = subprocess.run([str(START_SCRIPT), "--stop", "--state-dir", str(state_dir)], env=env,
                              capture_output=True, text=True, timeout=180)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert stop.returncode == 0, stop.stderr
    assert {name: _live_members(pgid) for name, pgid in pgids.items()} == {name: [] for name in pgids}
    assert not os.path.exists(state_dir / "head.pid")
