"""`python -m app`: which proxies uvicorn believes, and the metrics directory it prepares."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from app.__main__ import ServerSettings, prepare_multiprocess_metrics


def server(**values: Any) -> ServerSettings:
    return ServerSettings(_env_file=None, **values)


# --- proxies -------------------------------------------------------------------------


def test_with_no_proxy_configured_uvicorn_believes_no_forwarding_header() -> None:
    options = server().uvicorn_options()

    assert options["proxy_headers"] is False


def test_uvicorn_believes_the_same_proxies_as_the_app() -> None:
    options = server(trusted_proxies="10.0.0.0/8, 192.0.2.7").uvicorn_options()

    assert options["proxy_headers"] is True
    believed = options["forwarded_allow_ips"].split(",")
    assert {"10.0.0.0/8", "192.0.2.7"} <= set(believed)


def test_ipv4_proxies_are_also_believed_in_their_ipv4_mapped_ipv6_form() -> None:
    # On a dual-stack socket an IPv4 proxy connects as ::ffff:a.b.c.d; the app
    # normalises that to the IPv4 address, so uvicorn must believe it too.
    believed = server(trusted_proxies="10.0.0.0/8").uvicorn_options()["forwarded_allow_ips"]

    assert "::ffff:10.0.0.0/104" in believed.split(",")


def test_forwarded_allow_ips_overrides_the_app_list_for_uvicorn_verbatim() -> None:
    options = server(forwarded_allow_ips=" 10.1.1.1 ,10.1.1.2", trusted_proxies="10.0.0.0/8")

    assert options.uvicorn_options()["forwarded_allow_ips"] == "10.1.1.1,10.1.1.2"
    assert options.uvicorn_options()["proxy_headers"] is True


def test_blank_proxy_lists_trust_nobody() -> None:
    assert (
        server(forwarded_allow_ips="  ", trusted_proxies=" , ").uvicorn_options()["proxy_headers"]
        is False
    )


# --- multiprocess metrics directory ----------------------------------------------------


def test_the_metrics_directory_is_created_when_missing(tmp_path: Path) -> None:
    directory = tmp_path / "metrics" / "multiproc"

    found = prepare_multiprocess_metrics(server(), {"PROMETHEUS_MULTIPROC_DIR": str(directory)})

    assert found == directory
    assert directory.is_dir()


def test_the_metrics_directory_is_emptied_of_dead_workers_values_at_start(
    tmp_path: Path,
) -> None:
    stale = ["counter_4242.db", "gauge_livesum_4242.db", "histogram_17.db"]
    for name in stale:
        (tmp_path / name).write_bytes(b"\0" * 16)

    prepare_multiprocess_metrics(server(), {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})

    assert list(tmp_path.iterdir()) == []


def test_several_workers_without_a_metrics_directory_start_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.__main__"):
        prepare_multiprocess_metrics(server(web_concurrency=2), {})

    assert any("PROMETHEUS_MULTIPROC_DIR" in r.getMessage() for r in caplog.records)


def test_one_worker_without_a_metrics_directory_starts_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.__main__"):
        prepare_multiprocess_metrics(server(web_concurrency=1), {})

    assert caplog.records == []


def test_only_metric_files_are_removed_from_the_metrics_directory(tmp_path: Path) -> None:
    # A mistaken PROMETHEUS_MULTIPROC_DIR (/tmp, the app directory) loses nothing else.
    (tmp_path / "counter_1.db").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("not prometheus-client's")

    prepare_multiprocess_metrics(server(), {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})

    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
