"""Fixtures of the single-user server extension tests (run with ``-p pytest_jupyter.jupyter_server``,
separately from the Hub tests; see the Makefile's ``test`` target).

A real JupyterHub with the real labvault service (one per database kind, demo world seeded, data
stored encrypted through the chunk store) and, per test, a real jupyter_server (pytest-jupyter's
``jp_serverapp``) configured with the shipped ``labvault.json`` and one user's Hub token.
"""

from __future__ import annotations

import sys

import pytest
from extsupport import NOW, TESTS, main_conftest, seed_files, shipped_config, user_token
from traitlets.config import Config

from labvault.datastore import demo
from labvault.datastore import operations as ops
from labvault.datastore.db import make_engine, session_factory

sys.path.insert(0, str(TESTS))
from hubtools import start_hub  # noqa: E402


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def hub(request, tmp_path_factory):
    """One Hub + service per database kind for the whole extension run (tests leave
    the seeded files alone; what they add has paths of their own)."""
    workdir = tmp_path_factory.mktemp(f"exthub-{request.param}")
    url = main_conftest().fresh_database_url(request, request.param, workdir)
    engine = make_engine(url)
    factory = session_factory(engine)
    demo.seed(factory, ops.Actor(operator="test"), now=NOW)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    (data / "labvault_config.py").write_text("c.DatastoreService.max_upload_size = 8 * 1024 * 1024\n")
    contents = seed_files(factory, data, workdir)
    h = start_hub(workdir, url, now=NOW)
    h.contents = contents
    h.factory = factory
    h.tokens = {}
    yield h
    h.stop()
    engine.dispose()


@pytest.fixture(autouse=True)
def reset_clock(request):
    if "hub" not in request.fixturenames:
        yield
        return
    hub = request.getfixturevalue("hub")
    hub.set_clock(NOW)
    yield
    hub.set_clock(NOW)


@pytest.fixture
def user() -> str:
    """The Hub user whose token the server holds (parametrize ``user`` to change it)."""
    return "alice"


@pytest.fixture
def extra_config() -> dict:
    """More traitlets config for the server under test (override in a test module)."""
    return {}


@pytest.fixture
def jp_server_config(hub, user, extra_config):
    config = Config(shipped_config())
    config.ServiceConnection.service_url = hub.service_url
    config.ServiceConnection.api_token = user_token(hub, user)
    config.merge(Config(extra_config))
    return config


@pytest.fixture
def cm(jp_serverapp):
    return jp_serverapp.contents_manager
