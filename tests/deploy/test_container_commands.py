"""The image's commands, run on the host exactly as the Dockerfile spells them.

No Docker engine is needed: `CMD` and `HEALTHCHECK` are read from the Dockerfile
text (so editing either there changes what is tested here), the server is
started with that `CMD` on a free port, and the `HEALTHCHECK` command must pass
against it and fail once it has stopped. Every process started here is stopped
by its own process id.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from app import healthcheck
from tests.support import ROOT, free_port

DOCKERFILE = ROOT / "Dockerfile"
STARTUP_SECONDS = 30


@dataclass(frozen=True)
class Healthcheck:
    options: dict[str, str]
    command: list[str]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            result.append((keyword.upper(), arguments.strip()))
    return result


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _exec_form(arguments: str) -> list[str]:
    command = json.loads(arguments)
    assert isinstance(command, list), f"not exec form: {arguments}"
    assert all(isinstance(part, str) for part in command)
    return command


def dockerfile_cmd() -> list[str]:
    cmds = [args for keyword, args in _final_stage() if keyword == "CMD"]
    assert cmds, "the final stage has no CMD"
    return _exec_form(cmds[-1])


def dockerfile_healthcheck() -> Healthcheck:
    checks = [args for keyword, args in _final_stage() if keyword == "HEALTHCHECK"]
    assert checks, "the final stage has no HEALTHCHECK"
    options_text, _, command = checks[-1].partition("CMD ")
    options = dict(token.removeprefix("--").split("=", 1) for token in shlex.split(options_text))
    return Healthcheck(options=options, command=_exec_form(command.strip()))


def dockerfile_stopsignal() -> signal.Signals:
    signals = [args for keyword, args in _final_stage() if keyword == "STOPSIGNAL"]
    return signal.Signals[signals[-1]] if signals else signal.SIGTERM


def _environment(port: int, data_dir: Path, extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The host's environment without service settings, plus what a container would get."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OPENAI_", "REPLICATE_", "DATABASE_", "REDIS_", "HEALTHCHECK_"))
        and key not in {"HOST", "PORT", "WEB_CONCURRENCY", "SHUTDOWN_GRACE_SECONDS", "RELOAD"}
    }
    # `python` in CMD is the image's virtualenv interpreter; here, this one.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        HOST="127.0.0.1",
        PORT=str(port),
        DATABASE_SQLITE_PATH=str(data_dir / "stories.sqlite3"),
        LOG_LEVEL="INFO",
        **extra,
    )
    return env


def run_healthcheck(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        dockerfile_healthcheck().command,
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@dataclass
class Container:
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


@pytest.fixture
def container() -> Iterator[Container]:
    """The server started with the Dockerfile's CMD, live before the test begins."""
    with tempfile.TemporaryDirectory(prefix="story-cmd-") as tmp:
        data = Path(tmp)
        env = _environment(free_port(), data, {"SHUTDOWN_GRACE_SECONDS": "5"})
        log = data / "server.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                dockerfile_cmd(), cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT
            )
        running = Container(process=process, env=env, log=log)
        try:
            deadline = time.monotonic() + STARTUP_SECONDS
            while run_healthcheck(env).returncode != 0:
                if process.poll() is not None:
                    pytest.fail(f"CMD exited with {process.returncode}:\n{running.output()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"CMD not live within {STARTUP_SECONDS} s:\n{running.output()}")
                time.sleep(0.2)
            yield running
        finally:
            running.stop(signal.SIGKILL if process.poll() is None else signal.SIGTERM, 10)


def test_cmd_is_exec_form_python_module() -> None:
    assert dockerfile_cmd() == ["python", "-m", "app"]


def test_healthcheck_options_are_the_documented_ones() -> None:
    assert dockerfile_healthcheck().options == {
        "interval": "30s",
        "timeout": "10s",
        "start-period": "5s",
        "retries": "3",
    }


def test_healthcheck_gives_up_before_docker_does() -> None:
    docker_timeout = float(dockerfile_healthcheck().options["timeout"].removesuffix("s"))
    assert docker_timeout > healthcheck.DEFAULT_TIMEOUT_SECONDS


def test_healthcheck_module_imports_only_the_standard_library() -> None:
    probe = (
        "import sys; before = set(sys.modules); import app.healthcheck; "
        "print('\\n'.join(sorted(set(sys.modules) - before)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    loaded = {name.partition(".")[0] for name in result.stdout.split()}
    outside = loaded - set(sys.stdlib_module_names) - {"app"}
    assert not outside, f"app.healthcheck pulled in {sorted(outside)}"


def test_healthcheck_passes_against_the_server_started_by_cmd(container: Container) -> None:
    result = run_healthcheck(container.env)

    assert result.returncode == 0, result.stdout + result.stderr


def test_healthcheck_fails_once_the_server_has_stopped(container: Container) -> None:
    container.stop()

    result = run_healthcheck(container.env)

    assert result.returncode != 0
    assert "unreachable" in result.stderr


def test_stopsignal_drains_and_exits_cleanly_within_the_grace(container: Container) -> None:
    grace = float(container.env["SHUTDOWN_GRACE_SECONDS"])
    started = time.monotonic()

    stopsignal = dockerfile_stopsignal()
    code = container.stop(stopsignal, timeout=grace + 10)

    # uvicorn re-raises the signal it caught once shutdown is complete, so a clean
    # stop ends "killed by SIGTERM" (Docker shows 143), never by SIGKILL.
    assert code in {0, -stopsignal}, container.output()
    assert time.monotonic() - started < grace + 10
    assert "Application shutdown complete" in container.output()
