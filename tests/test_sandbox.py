"""The real daemon (``imsd once``) under the restrictions of systemd/imsd.service that can be
emulated without systemd as PID 1:

- ``User=imsd``: an unprivileged uid/gid (65534 here) with no supplementary groups;
- ``NoNewPrivileges=yes``, ``CapabilityBoundingSet=`` (empty), ``AmbientCapabilities=``;
- ``UMask=0077``;
- ``ProtectSystem=strict`` with ``StateDirectory``/``RuntimeDirectory`` writable: in a private
  mount namespace, ``/`` is remounted read-only and only the state and output dirs are bound
  writable (the credentials stay read-only);
- ``PrivateTmp=yes`` and ``ProtectHome=yes``: empty tmpfs on ``/tmp``; ``/root`` and
  ``/home`` hidden (except one holding the interpreter itself);
- ``MemoryDenyWriteExecute=yes``: after the full run, no mapping of the process is both
  writable and executable (MDWE's seccomp filter would have killed the process on creating
  one).

Not emulated here (they need systemd's seccomp and namespace set-up): ``SystemCallFilter``,
``RestrictAddressFamilies``, ``PrivateUsers``, ``PrivateDevices``, ``ProtectKernel*``,
``ProtectProc``/``ProcSubset``, ``RestrictNamespaces``; ``systemd-analyze security`` checks
their presence (tests/test_deploy.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from imsd.fakeims.server import FakeIms

from tests.support import ORG, SCOPES, SECRET

NOBODY = 65534

CHECK = textwrap.dedent(
    """
    import os, sys
    from imsd.cli import main
    code = main(sys.argv[1:])
    wx = [l for l in open("/proc/self/maps") if "w" in l.split()[1] and "x" in l.split()[1]]
    try:
        open(os.path.join(os.path.dirname(sys.executable), "imsd-sandbox-probe"), "w")
        writable_system = True
    except OSError:
        writable_system = False
    print(f"exit={code} wx={len(wx)} uid={os.getuid()} umask={os.umask(0):o}"
          f" writable_system={writable_system} tmp={sorted(os.listdir('/tmp'))}")
    sys.exit(code)
    """
)


@pytest.fixture
def base() -> Iterator[Path]:
    # Not under /tmp (PrivateTmp hides it) and traversable by the unprivileged user.
    path = Path(tempfile.mkdtemp(prefix="imsd-sandbox-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set up the mount namespace")
def test_once_under_the_units_restrictions(base: Path) -> None:
    for tool in ("unshare", "setpriv", "mount"):
        assert shutil.which(tool), f"{tool} not found (util-linux)"
    creds, out, state = base / "creds", base / "tokens", base / "state"
    for d in (creds, out, state):
        d.mkdir()
    (creds / "aep.secret").write_text(SECRET + "\n")
    with FakeIms.in_thread() as fake:
        fake.state.add_client("client-a", secrets=[SECRET], scopes=SCOPES, org_id=ORG)
        (creds / "aep.toml").write_text(
            f'client_id = "client-a"\nclient_secret_file = "aep.secret"\norg_id = "{ORG}"\n'
            f'scopes = {SCOPES!r}\nims_url = "{fake.url}"\nproducts = ["aep"]\n'.replace("'", '"')
        )
        for p in (creds, creds / "aep.toml", creds / "aep.secret", out, state):
            os.chown(p, NOBODY, NOBODY)
        (creds / "aep.secret").chmod(0o400)
        (base / "check.py").write_text(CHECK)
        # ProtectHome hides /root and /home, except where this test's Python lives (a
        # pyenv under /root here; a packaged install never is).
        python = Path(sys.executable).resolve()
        homes = [h for h in ("/root", "/home") if Path(h).is_dir() and not python.is_relative_to(h)]
        # PrivateTmp hides /tmp; a checkout (and its venv) under /tmp, as in a CI clone, is
        # carried over read-only: its top directory is bound aside and back onto the new tmpfs.
        keep = sorted(
            {
                Path("/tmp", p.relative_to("/tmp").parts[0])
                for p in (Path(__file__).resolve(), Path(sys.executable).absolute())
                if p.is_relative_to("/tmp")
            }
        )
        aside = [base / f"keep{i}" for i in range(len(keep))]
        for a in aside:
            a.mkdir()
        save = "\n".join(f"mount --bind {k} {a}" for k, a in zip(keep, aside, strict=True))
        restore = "\n".join(
            f"mkdir {k} && mount --bind {a} {k} && mount -o remount,bind,ro {k}"
            for k, a in zip(keep, aside, strict=True)
        )
        script = textwrap.dedent(
            f"""
            set -e
            mount --bind {out} {out}
            mount --bind {state} {state}
            {save}
            mount -o remount,bind,ro /
            mount -t tmpfs -o mode=1777 tmpfs /tmp
            {restore}
            for home in {" ".join(homes)}; do mount -t tmpfs -o ro,mode=0 tmpfs $home; done
            umask 077
            exec setpriv --no-new-privs --reuid={NOBODY} --regid={NOBODY} --clear-groups \\
                --bounding-set=-all --inh-caps=-all \\
                {sys.executable} {base / "check.py"} once --credentials-dir {creds} \\
                --output-dir {out} --state-dir {state} --metrics-address "" --log-format json
            """
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMSD_")}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        # The system's tools, not a PATH entry under /tmp that PrivateTmp hides.
        env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        requests = fake.state.request_count()
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    kept = sorted(k.name for k in keep)
    assert f"exit=0 wx=0 uid={NOBODY} umask=77 writable_system=False tmp={kept}" == summary
    token = out / "aep" / "token"
    assert token.stat().st_uid == NOBODY
    assert token.stat().st_mode & 0o777 == 0o600
    assert (state / "state.db").stat().st_mode & 0o777 == 0o600
    assert {p.stat().st_mode & 0o777 for p in state.iterdir()} == {0o600}
    assert requests == 1
    assert SECRET not in result.stdout + result.stderr
