"""Schemathesis against the running app, with every check it has: zero failures.

`python -m app` with bearer JWTs on (`conftest.contract_server`), its own
`/openapi.json` (the same document as `docs/openapi.json`, see
test_openapi_document.py), a valid token, all phases (examples, coverage,
fuzzing, stateful), `--checks all`. Bounded: a fixed number of examples per
operation and a time budget, with a fixed seed so a CI run is repeatable;
`CONTRACT_FUZZ_SEED=random` (or a number) explores further on a workstation.
The budget ends the run; it is not a threshold any answer is held to.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.contract.conftest import bearer
from tests.support import ROOT, Server

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 12
MAX_SECONDS = 90
SEED = "20261201"


def test_schemathesis_finds_nothing(contract_server: Server, tmp_path: Path) -> None:
    seed = os.environ.get("CONTRACT_FUZZ_SEED", SEED)
    # The token for the document's `bearerAuth` scheme (not a raw header): schemathesis
    # then knows it is the credential, and leaves it out where it tests without one.
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[auth.openapi.bearerAuth]\nbearer = "{bearer(ttl=3600)}"\n')
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{contract_server.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--max-time",
        str(MAX_SECONDS),
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    if seed != "random":
        command += ["--seed", seed]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.contract.schemathesis_hooks",
        "NO_COLOR": "1",
        "PYTHONPATH": str(ROOT),
    }
    # In the temporary directory: schemathesis keeps a crash cache in its working directory.
    run = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=MAX_SECONDS * 4
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, (
        output[-20000:] + "\n--- server ---\n" + contract_server.output()[-5000:]
    )
    assert "Operations:" in output
