"""Only licensed kernels are listed and started; the shipped config enables the extension and its
managers; the connection finds the service and token where the spawner puts them."""

from __future__ import annotations

import json

import pytest
from extsupport import ROOT, SHIPPED_CONFIG, shipped_config
from tornado import web

from labvault.extension import _jupyter_server_extension_points
from labvault.extension.app import LabvaultExtension
from labvault.extension.contents import LabvaultContentsManager
from labvault.extension.kernelspecs import (
    KernelNotLicensed,
    LicensedKernelSpecManager,
    allowed_from_env,
)
from labvault.extension.remote import ServiceConnection


# --- kernels (no Hub needed: a server with the shipped config and no service) --------------------
@pytest.fixture
def allowed(request, monkeypatch):
    """``$LABVAULT_ALLOWED_KERNELS`` for the server under test (None: unset)."""
    value = getattr(request, "param", None)
    if value is None:
        monkeypatch.delenv("LABVAULT_ALLOWED_KERNELS", raising=False)
    else:
        monkeypatch.setenv("LABVAULT_ALLOWED_KERNELS", value)
    return value


@pytest.fixture
def extra() -> dict:
    return {}


@pytest.fixture
def jp_server_config(allowed, extra, monkeypatch):
    from traitlets.config import Config

    for name in ("LABVAULT_SERVICE_URL", "JUPYTERHUB_API_URL", "JUPYTERHUB_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    config = Config(shipped_config())
    config.merge(Config(extra))
    return config


async def specs(jp_fetch) -> dict:
    return json.loads((await jp_fetch("api", "kernelspecs")).body)


async def test_without_the_variable_only_python3(jp_fetch, allowed, echo_kernel_spec):
    body = await specs(jp_fetch)
    assert set(body["kernelspecs"]) == {"python3"} and body["default"] == "python3"
    r = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "echo"}), raise_error=False)
    assert r.code == 403
    reply = json.loads(r.body)
    assert "not licensed" in reply["message"] and reply["reason"] == "environment.licensed"
    r = await jp_fetch("api", "sessions", method="POST", raise_error=False, body=json.dumps(
        {"path": "a.ipynb", "type": "notebook", "kernel": {"name": "echo"}}))
    assert r.code == 501 and "echo" in json.loads(r.body)["message"]  # jupyter_server's own answer


@pytest.mark.parametrize("allowed", ["echo, detectorco-suite"], indirect=True)
async def test_the_spawner_list_is_obeyed(jp_fetch, allowed, echo_kernel_spec, jp_serverapp):
    body = await specs(jp_fetch)
    assert set(body["kernelspecs"]) == {"echo"}  # detectorco-suite is not installed here
    assert body["default"] == "echo"  # python3 is not allowed: new notebooks get the echo kernel
    r = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "python3"}), raise_error=False)
    assert r.code == 403
    r = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "echo"}))
    assert r.code == 201  # an allowed kernel starts
    kernel = json.loads(r.body)
    await jp_fetch("api", "kernels", kernel["id"], method="DELETE")


@pytest.mark.parametrize("extra", [{"ServerApp": {"kernel_spec_manager_class":
                                                   "jupyter_client.kernelspec.KernelSpecManager"}}])
async def test_explicit_server_config_wins(jp_serverapp, extra):
    assert isinstance(jp_serverapp.contents_manager, LabvaultContentsManager)
    assert type(jp_serverapp.kernel_spec_manager).__name__ == "KernelSpecManager"


@pytest.mark.parametrize("allowed", [""], indirect=True)
async def test_an_empty_list_allows_nothing(jp_fetch, allowed, echo_kernel_spec):
    body = await specs(jp_fetch)
    assert body["kernelspecs"] == {}


def test_allowed_from_env():
    assert allowed_from_env(None) == {"python3"}
    assert allowed_from_env("") == set()
    assert allowed_from_env(" Python3 ,, Detectorco-Suite ") == {"python3", "detectorco-suite"}
    ksm = LicensedKernelSpecManager(allowed_kernels={"python3"})
    with pytest.raises(KernelNotLicensed) as e:
        ksm.get_kernel_spec("secret-kernel")
    assert isinstance(e.value, web.HTTPError) and e.value.status_code == 403


# --- the shipped configuration -----------------------------------------------------------------
def test_the_shipped_config_enables_the_extension():
    config = json.loads(SHIPPED_CONFIG.read_text())
    # jupyter_server reads only jpserver_extensions from config.d files: the extension selects
    # its managers itself (test_the_server_runs_with_the_shipped_config)
    assert config == {"ServerApp": {"jpserver_extensions": {"labvault.extension": True}}}
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data_files = pyproject["tool"]["setuptools"]["data-files"]
    assert data_files["etc/jupyter/jupyter_server_config.d"] == [str(SHIPPED_CONFIG.relative_to(ROOT))]
    assert _jupyter_server_extension_points() == [{"module": "labvault.extension", "app": LabvaultExtension}]


async def test_the_server_runs_with_the_shipped_config(jp_serverapp, jp_fetch, allowed):
    """Only the extension is enabled; it selects the contents and kernel spec managers."""
    assert isinstance(jp_serverapp.contents_manager, LabvaultContentsManager)
    assert isinstance(jp_serverapp.kernel_spec_manager, LicensedKernelSpecManager)
    assert "labvault.extension" in jp_serverapp.extension_manager.extensions
    # no service configured here: the home works, /experiments says what is missing
    root = json.loads((await jp_fetch("api", "contents")).body)
    assert "experiments" in {m["name"] for m in root["content"]}
    r = await jp_fetch("api", "contents", "experiments", raise_error=False)
    assert r.code == 503 and "LABVAULT_SERVICE_URL" in json.loads(r.body)["message"]


def test_the_connection_reads_what_the_spawner_sets(monkeypatch):
    monkeypatch.delenv("LABVAULT_DIRECT_READ_ROOT", raising=False)
    monkeypatch.setenv("LABVAULT_SERVICE_URL", "http://127.0.0.1:1/services/labvault/")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "s3cret-token")
    conn = ServiceConnection()
    assert conn.client.url == "http://127.0.0.1:1/services/labvault"
    assert conn.client.headers == {"Authorization": "token s3cret-token"}
    assert conn.client.direct is False  # served reads unless the ciphertext is mounted
    conn.close()
    monkeypatch.setenv("LABVAULT_DIRECT_READ_ROOT", "/srv/labvault-ciphertext")
    conn = ServiceConnection()
    assert conn.direct_reads is True and conn.client.direct is None  # lease when offered
    conn.close()


async def test_the_server_access_log_has_no_full_ip(jp_serverapp, jp_fetch, allowed, caplog):
    """The single-user server logs requests like the Hub and the service: 127.0.x.x, not 127.0.0.1."""
    import logging

    from labvault.extension.app import log_request_masked

    assert jp_serverapp.web_app.settings["log_function"] is log_request_masked
    with caplog.at_level(logging.DEBUG):
        await jp_fetch("api", "contents", "nope-does-not-exist", raise_error=False)
    lines = [r.getMessage() for r in caplog.records if "nope-does-not-exist" in r.getMessage()]
    assert lines and all("127.0.x.x" in line and "127.0.0.1" not in line for line in lines), lines
