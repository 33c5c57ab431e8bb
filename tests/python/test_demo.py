"""``scripts/demo``, the README's first command, run as a newcomer would.

It builds the binaries (dev profile: already built by scripts/test), starts
``dccontrol serve`` on a free loopback port (``DEMO_PORT=0``: the script
reads the bound address from dccontrol's first line and hands it to both the
runner and ``dccontrol run``), queues the demo's commands and stops. The
state directory, the database and the logs go to the test's own directory.
"""

import os
import subprocess

from harness import ROOT

TIMEOUT = 600  # seconds: may build dccontrol first on a cold target/


def test_demo_script_runs_on_a_free_port(tmp_path):
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("DJANGOCOMMAND_", "DCSUPERVISOR_", "DCCONTROL_"))
    }
    env.update(
        DEMO_PORT="0",
        DEMO_LOG_DIR=str(tmp_path / "logs"),
        DEMO_DB_PATH=str(tmp_path / "demo.sqlite3"),
        DCSUPERVISOR_RUNNER__STATE_DIR=str(tmp_path / "state"),
        NO_COLOR="1",
    )
    result = subprocess.run(
        [ROOT / "scripts" / "demo"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    logs = "".join(
        f"\n--- {path.name}\n{path.read_text()}"
        for path in sorted((tmp_path / "logs").glob("*.log"))
    )
    assert result.returncode == 0, result.stdout + result.stderr + logs
    out = result.stdout
    assert "hello from the demo" in out, out + logs
    # The refusal is the execution's stderr, which `dccontrol run` passes on.
    assert "rejected by runner security policy" in result.stderr, result.stderr
    assert out.count("--follow") == 7, out
    # `dccontrol list`: each execution ended as the demo means it to.
    listing = out[out.index("dccontrol list") :]
    statuses = [line.split()[1] for line in listing.splitlines()[2:] if line.strip()]
    assert statuses[:7] == [
        *["success", "success", "success", "failed", "timed_out", "success"],
        "failed",
    ], listing
    # The one control plane the script started served every call: the runner
    # and `dccontrol run` agreed on its port (8765 is not listening).
    control_log = (tmp_path / "logs" / "demo-control.log").read_text()
    assert "listening on http://127.0.0.1:" in control_log
    assert "127.0.0.1:8765" not in control_log
    assert "stopped" in (tmp_path / "logs" / "demo-supervisor.log").read_text()
