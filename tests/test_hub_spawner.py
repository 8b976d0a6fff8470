"""The licensed-environment spawner and the reconciler, against a real JupyterHub.

One Hub per database kind (module-scoped), with LabvaultLocalSpawner starting real
single-user servers, the datastore service it manages, a real SMTP server (aiosmtpd) for the
notices, and the demo world. The Docker and Kubernetes compositions have no daemon or cluster
here: their container and pod specs are built from a real answer of the service and checked.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest.mock import Mock

import h5py
import numpy as np
import pytest
import requests
from conftest import fresh_database_url
from hubtools import start_hub
from sqlalchemy import select

from labvault.datastore import demo
from labvault.datastore import operations as ops
from labvault.datastore.db import make_engine, session_factory
from labvault.datastore.mail import LocalMailbox
from labvault.datastore.models import AuditEvent, Notice, StoredFile, User
from labvault.datastore.store import ChunkStore
from labvault.hub.reconciler import Verdict, compare
from labvault.hub.spawner import _options_from_form, render_options_form
from labvault.kernels.catalogue import (
    DEFAULT_CATALOGUE,
    install_kernelspecs,
    load_catalogue,
    sync_catalogue,
)

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime.now(timezone.utc).replace(microsecond=0)
SINGLEUSER = str(Path(sys.executable).parent / "jupyterhub-singleuser")
HEAVY = ("docker", "dockerspawner", "kubernetes", "kubernetes_asyncio", "kubespawner")


# ----------------------------------------------------------------------------------------
# without a Hub
# ----------------------------------------------------------------------------------------
def test_importing_labvault_never_imports_docker_or_kubernetes():
    code = ("import sys, labvault, labvault.hub, labvault.hub.spawner, labvault.hub.reconciler, "
            "labvault.kernels.catalogue\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # and the compositions do import them (so the test above could fail)
    out = subprocess.run([sys.executable, "-c", "import sys, labvault.hub.docker, labvault.hub.kube\n"
                          "print('dockerspawner' in sys.modules, 'kubespawner' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


def test_options_from_form_is_pure():
    form = {"environment": ["detectorco-suite"], "_xsrf": ["x"]}
    assert _options_from_form(form) == {"environment": "detectorco-suite"}
    assert form == {"environment": ["detectorco-suite"], "_xsrf": ["x"]}
    assert _options_from_form({}) == {} and _options_from_form({"environment": [""]}) == {}


def test_options_form_html():
    answer = {
        "environments": [
            {"name": "python-scientific", "display_name": "Python <3>", "licences": [], "proprietary": False},
            {"name": "alpine-pipeline", "display_name": "Alpine", "licences": [], "proprietary": True},
        ],
        "unavailable": [{"name": "detectorco-suite", "display_name": "DetectorCo",
                         "reason": "your institution holds no valid licence for detectorco-analysis"}],
        "last_stop": {"time": "2026-01-02T03:04:05+00:00", "rule": "facility.access_window"},
    }
    form = render_options_form(answer, default_environment="alpine-pipeline")
    assert 'value="alpine-pipeline" checked' in form and 'value="python-scientific">' in form
    assert "Python &lt;3&gt;" in form and "<3>" not in form
    assert 'value="detectorco-suite"' not in form and "no valid licence for detectorco-analysis" in form
    assert "stopped on 2026-01-02 03:04" in form and "facility.access_window" in form
    assert "no environment you may" in render_options_form({"environments": []})


def test_compare_started_and_current_sets():
    now = {"active": True, "experiments": [{"exid": "A"}, {"exid": "C"}],
           "environment": {"name": "e", "usable": True, "rule": "environment.licensed", "reason": "ok"}}
    v = compare(["A", "B"], now)
    assert v.lost == ("B",) and v.gained == ("C",) and v.stop
    assert not compare(["A"], now).stop  # more access is no reason to stop
    gone = {**now, "environment": {"name": "e", "usable": False, "rule": "environment.licensed",
                                   "reason": "no valid licence"}, "experiments": []}
    assert compare([], gone) == Verdict(environment_rule="environment.licensed",
                                        environment_reason="no valid licence")
    assert compare([], {"active": False, "experiments": []}).inactive


def local_spawner(**traits):
    from jupyterhub.objects import Hub

    from labvault.hub.spawner import LabvaultLocalSpawner

    spawner = LabvaultLocalSpawner(user=MockUser("frank"), hub=Hub(), **traits)
    spawner.datastore.url = "http://127.0.0.1:9/services/labvault"  # nothing listens there
    return spawner


def test_an_unreachable_service_refuses_clearly():
    from tornado import web

    spawner = local_spawner()
    for call in (lambda: spawner.apply_user_options(spawner, {"environment": "python-scientific"}),
                 spawner.get_options_form):
        with pytest.raises(web.HTTPError) as e:
            asyncio.run(call())
        assert e.value.status_code == 503 and "not reachable" in e.value.log_message


def test_start_validates_even_when_a_deployment_replaced_apply_user_options():
    from tornado import web

    spawner = local_spawner(apply_user_options=lambda spawner, options: None)
    spawner.user_options = {"environment": "python-scientific", "image": "evil"}
    with pytest.raises(web.HTTPError) as e:
        asyncio.run(spawner.start())
    assert e.value.status_code == 400 and spawner.pid == 0  # refused before any process started


def test_the_started_set_survives_in_the_spawner_state():
    spawner = local_spawner()
    spawner.labvault_apply_start({"environment": {"name": "python-scientific", "kernelspec": "python3"},
                                  "experiments": [{"exid": "A", "files": []}], "time": "2026-01-01T00:00:00+00:00",
                                  "direct_read_root": None})
    state = spawner.get_state()
    assert state["labvault"] == {"environment": "python-scientific", "experiments": ["A"],
                                 "started_at": "2026-01-01T00:00:00+00:00", "kernels": ["python3"]}
    again = local_spawner()
    again.load_state(state)
    assert (again.labvault_environment, again.labvault_experiments) == ("python-scientific", ["A"])
    again.clear_state()
    assert again.get_state().get("labvault") is None and again.labvault_mounts() == []


# ----------------------------------------------------------------------------------------
# a real Hub with the labvault local spawner
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mailbox(tmp_path_factory):
    with LocalMailbox(tmp_path_factory.mktemp("mail")) as box:
        yield box


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def hub(request, tmp_path_factory, mailbox):
    workdir = tmp_path_factory.mktemp(f"spawner-{request.param}")
    url = fresh_database_url(request, request.param, workdir)
    engine = make_engine(url)
    factory = session_factory(engine)
    demo.seed(factory, ops.Actor(operator="test"), now=NOW)
    # the catalogue: the shipped environments plus one whose kernelspec is installed for servers
    catalogue = workdir / "catalogue"
    shutil.copytree(DEFAULT_CATALOGUE, catalogue)
    (catalogue / "xrd-lab.toml").write_text(
        'name = "xrd-lab"\ndisplay_name = "XRD lab"\n\n[kernelspec]\nname = "xrd-py"\n'
        'display_name = "XRD (Python)"\nlanguage = "python"\n'
        'argv = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]\n')
    manifests = load_catalogue(catalogue)
    sync_catalogue(factory, ops.Actor(operator="test"), manifests, now=NOW)
    install_kernelspecs(manifests, workdir / "share")
    data = workdir / "data"
    data.mkdir()
    (data / "labvault_config.py").write_text(
        f"c.DatastoreService.direct_read_root = '/mnt/labvault'\n"
        f"c.Mailer.smtp_host = {mailbox.host!r}\nc.Mailer.smtp_port = {mailbox.port}\n")
    store = ChunkStore(sessions=factory, data_dir=str(data))
    store.prepare_locations()
    src = workdir / "frames.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("entry/data", data=np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16))
    with factory() as s:
        alice_id = s.scalar(select(User.id).where(User.name == "alice"))
    for exid in ("NLS-2026-0001", "NLS-2026-0002"):
        store.ingest_file(ops.Actor(user_id=alice_id), exid, src, "scan/frames.h5", now=NOW)
    config = f"""
c.JupyterHub.spawner_class = "labvault-local"
c.Spawner.cmd = [{SINGLEUSER!r}]
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
c.Spawner.poll_interval = 1
c.Spawner.default_url = "/lab"
c.ServerReconciler.interval = 1
c.LabvaultLocalSpawner.run_as_hub_user = True
c.LabvaultLocalSpawner.home_root = {str(workdir / "homes")!r}
c.LabvaultLocalSpawner.kernel_data_dirs = [{str(workdir / "share")!r}]
c.JupyterHub.load_roles.append({{"name": "test-admin-servers", "services": ["test-admin"],
                                  "scopes": ["admin:servers", "admin:server_state"]}})
"""
    h = start_hub(workdir, url, now=NOW, service_config=config)
    h.factory, h.store_dir = factory, data / "store"
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
    for name in ("frank", "alice", "carol", "bob", "vera"):  # leave no server running
        hub.hub_request("DELETE", f"/users/{name}/server")


def hub_internal(hub, method, path, body=None):
    r = hub.http.request(method, f"{hub.service_url}/api/v1/hub{path}",
                         headers={"Authorization": f"labvault-hub {hub.hub_secret}"},
                         body=json.dumps(body) if body is not None else None)
    return r.status, json.loads(r.data)


def spawn(hub, name, options):
    hub.ensure_user(name)
    return hub.hub_request("POST", f"/users/{name}/server", options)


def server_model(hub, name):
    r = hub.hub_request("GET", f"/users/{name}")
    assert r.status == 200, r.data
    return json.loads(r.data)["servers"].get("")


def wait_ready(hub, name, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = server_model(hub, name)
        if model and model.get("ready"):
            return model
        if model is None:
            raise AssertionError(f"{name}'s server went away:\n{(hub.workdir / 'hub.log').read_text()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"{name}'s server not ready:\n{(hub.workdir / 'hub.log').read_text()[-3000:]}")


def wait_stopped(hub, name, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server_model(hub, name) is None:
            return
        time.sleep(0.3)
    raise AssertionError(f"{name}'s server still runs:\n{(hub.workdir / 'hub.log').read_text()[-3000:]}")


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def login(hub, name) -> requests.Session:
    """Log in through the Hub's login page (dummy authenticator), as a browser does."""
    s = requests.Session()
    s.get(f"{hub.url}/hub/login", timeout=30)
    r = s.post(f"{hub.url}/hub/login", data={"username": name, "password": "x", "_xsrf": s.cookies.get("_xsrf")},
               allow_redirects=False, timeout=30)
    assert r.status_code == 302, r.text[:500]
    return s


def test_the_form_offers_only_what_the_user_may_start(hub):
    s = login(hub, "frank")  # Nordic Light Source: no licence, not Alpine
    page = s.get(f"{hub.url}/hub/spawn/frank", timeout=30).text
    assert 'value="python-scientific"' in page
    assert 'value="detectorco-suite"' not in page and "no valid licence for detectorco-analysis" in page
    assert "alpine-pipeline" not in page and "Alpine in-house" not in page  # never named outside Alpine
    page = login(hub, "alice").get(f"{hub.url}/hub/spawn/alice", timeout=30).text
    for env in ("python-scientific", "detectorco-suite", "alpine-pipeline"):
        assert f'value="{env}"' in page
    # a forged form submission is refused with the reason, and nothing starts
    r = s.post(f"{hub.url}/hub/spawn/frank", data={"environment": "detectorco-suite", "_xsrf": s.cookies.get("_xsrf")},
               timeout=60)
    assert r.status_code == 403 and "no valid licence for detectorco-analysis" in r.text
    assert server_model(hub, "frank") is None


@pytest.mark.parametrize("options, status, message", [
    ({"environment": "detectorco-suite"}, 403, "no valid licence for detectorco-analysis"),
    ({"environment": "alpine-pipeline"}, 400, "no environment 'alpine-pipeline' you may use"),
    ({"environment": "no-such-env"}, 400, "no environment 'no-such-env' you may use"),
    ({"environment": "../etc/passwd"}, 400, "must be the name of an environment"),
    ({"environment": ["python-scientific"]}, 400, "must be the name of an environment"),
    ({"environment": "python-scientific", "image": "evil/image"}, 400, "unknown option(s) 'image'"),
])
def test_forged_or_unlicensed_choices_are_refused(hub, options, status, message):
    r = spawn(hub, "frank", options)
    assert r.status == status, r.data
    assert message in json.loads(r.data)["message"]
    assert server_model(hub, "frank") is None


def test_refusals_and_starts_are_audited(hub):
    spawn(hub, "frank", {"environment": "alpine-pipeline"})
    with hub.factory() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "environment.start",
                                                         AuditEvent.actor == "frank")))
    refused = [e for e in events if e.target == "environment:alpine-pipeline"]
    assert refused and not refused[-1].allowed
    assert refused[-1].rule == "environment.proprietary_institution_only"  # the real rule, though 404 outside


def test_spawned_server_holds_the_service_token_and_no_secret(hub):
    """A real server: its environment carries the service URL, a token that works against the
    service, the allowed kernel; never the database URL, the Hub's secret or a key."""
    r = spawn(hub, "carol", {"environment": "xrd-lab"})
    assert r.status in (201, 202), r.data
    model = wait_ready(hub, "carol")
    state = model["state"]
    assert state["labvault"]["environment"] == "xrd-lab"
    assert state["labvault"]["experiments"] == ["NLS-2026-0002"]  # the public experiment only
    env = environ(state["pid"])
    assert env["LABVAULT_SERVICE_URL"] == hub.service_url
    assert env["LABVAULT_ENVIRONMENT"] == "xrd-lab" and env["LABVAULT_ALLOWED_KERNELS"] == "xrd-py"
    assert env["HOME"].endswith("/homes/carol") and env["JUPYTER_PATH"].endswith("/share")
    for key in ("LABVAULT_DB_URL", "LABVAULT_HUB_SECRET", "LABVAULT_MASTER_KEY", "CONFIGPROXY_AUTH_TOKEN",
                "JUPYTERHUB_CRYPT_KEY"):
        assert key not in env
    blob = "\0".join(env.values())
    assert hub.hub_secret not in blob and hub.db_url not in blob and "keys/" not in blob
    # the token JupyterHub gave the server is scoped to the service, and the service accepts it
    token = env["JUPYTERHUB_API_TOKEN"]
    r = hub.http.request("GET", f"{env['LABVAULT_SERVICE_URL']}/api/v1/experiments",
                         headers={"Authorization": f"token {token}"})
    assert r.status == 200, r.data
    assert sorted(e["exid"] for e in json.loads(r.data)["experiments"]) == ["NLS-2026-0002"]
    # the server offers the environment's kernel (installed from the catalogue), no other
    r = hub.http.request("GET", f"{hub.url}/user/carol/api/kernelspecs", headers={"Authorization": f"token {token}"})
    assert r.status == 200, r.data
    assert sorted(json.loads(r.data)["kernelspecs"]) == ["xrd-py"]
    # ... and the kernel-side client works with exactly what the server has
    out = subprocess.run([sys.executable, "-c", "from labvault.datastore.client import Client\n"
                          "print([e['exid'] for e in Client().experiments()])"],
                         env={"PATH": os.environ["PATH"], **{k: env[k] for k in
                              ("JUPYTERHUB_API_TOKEN", "LABVAULT_SERVICE_URL")}},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "['NLS-2026-0002']", out.stderr[-2000:]


def test_reconciler_stops_servers_whose_set_shrank(hub, mailbox):
    """Facility day 30 (frank) and an expired licence (alice's DetectorCo suite) stop those
    servers, with an audit event and a mail; carol's server, whose set did not shrink, runs on."""
    starts = (("frank", "python-scientific"), ("alice", "detectorco-suite"), ("carol", "python-scientific"))
    with ThreadPoolExecutor(3) as pool:  # the three servers start at once
        for r in pool.map(lambda a: spawn(hub, a[0], {"environment": a[1]}), starts):
            assert r.status in (201, 202), r.data
    for name, _ in starts:
        wait_ready(hub, name)
    assert server_model(hub, "frank")["state"]["labvault"]["experiments"] == ["NLS-2026-0001", "NLS-2026-0002"]
    time.sleep(2.5)  # a few reconciler rounds: nothing changed, nothing stops
    assert all(server_model(hub, n) for n in ("frank", "alice", "carol"))

    before = len(mailbox.messages())
    hub.set_clock(NOW + timedelta(days=400))  # past facility day 30, past the licence's end
    wait_stopped(hub, "frank")
    wait_stopped(hub, "alice")
    time.sleep(2.5)
    assert server_model(hub, "carol") is not None  # NLS-2026-0002 is public: still hers

    msgs = {to: mailbox.wait_for(lambda m, to=to: m["To"] == to)
            for to in ("frank@nls.example", "alice@alpine-uni.example")}
    frank = msgs["frank@nls.example"].get_content()
    assert "NLS-2026-0001" in frank and "facility.access_window" in frank
    assert "NLS-2026-0002" not in frank.split("Nothing of")[0]  # only what was lost
    alice = msgs["alice@alpine-uni.example"].get_content()
    assert "detectorco-suite" in alice and "no valid licence" in alice
    assert len(mailbox.messages()) - before == 2
    with hub.factory() as s:
        stops = {e.target: e for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "server.stop"))}
        notices = {n.user_id: n for n in s.scalars(select(Notice).where(Notice.kind == "server.stopped"))}
    assert stops["server:frank/"].rule == "facility.access_window" and not stops["server:frank/"].allowed
    assert stops["server:alice/"].rule == "environment.licensed"
    assert all(n.sent_at is not None for n in notices.values()) and len(notices) == 2
    # the next spawn form says why the server was stopped
    page = login(hub, "frank").get(f"{hub.url}/hub/spawn/frank", timeout=30).text
    assert "Your last server was stopped" in page


def test_reconciler_stops_a_server_when_a_role_is_revoked(hub, mailbox):
    r = spawn(hub, "bob", {"environment": "detectorco-suite"})  # a licensed environment
    assert r.status in (201, 202), r.data
    state = wait_ready(hub, "bob")["state"]
    assert "NLS-2026-0001" in state["labvault"]["experiments"]
    with hub.factory() as s:
        alice = s.scalar(select(User.id).where(User.name == "alice"))
    ops.revoke_role(hub.factory, ops.Actor(user_id=alice), "NLS-2026-0001", "bob", now=NOW)
    try:
        wait_stopped(hub, "bob")
        mail = mailbox.wait_for(lambda m: m["To"] == "bob@alpine-uni.example").get_content()
        assert "NLS-2026-0001" in mail and "only users the PI assigned" in mail
    finally:
        ops.grant_role(hub.factory, ops.Actor(user_id=alice), "NLS-2026-0001", "bob", "writer", now=NOW)


# ----------------------------------------------------------------------------------------
# Docker and Kubernetes: the specs built from a real answer of the service
# ----------------------------------------------------------------------------------------
class MockUser(Mock):
    """What the spawners read of a JupyterHub user (as kubespawner's own tests mock it)."""

    def __init__(self, name="fake", **kwargs):
        from jupyterhub.objects import Server

        super().__init__(**kwargs)
        self.name, self.server = name, Server()

    @property
    def escaped_name(self):
        return self.name

    @property
    def url(self):
        return self.server.url


def start_answer(hub, name, env):
    status, answer = hub_internal(hub, "POST", f"/users/{name}/environments/{env}/start", {"server": ""})
    assert status == 200, answer
    return answer


def stored_objects(hub, exids):
    """{(location, object key)} of the stored files of ``exids``."""
    from labvault.datastore.models import Experiment
    from labvault.datastore.store.format import object_key

    with hub.factory() as s:
        rows = s.execute(select(StoredFile.uuid, StoredFile.locations).join(
            Experiment, Experiment.id == StoredFile.experiment_id).where(Experiment.exid.in_(exids)))
        return {(loc, object_key(uuid)) for uuid, locs in rows for loc in locs}


def test_docker_mounts_exactly_the_permitted_experiments(hub):
    from jupyterhub.objects import Hub
    from traitlets.config import Config

    from labvault.hub.docker import LabvaultDockerSpawner

    c = Config()
    c.DockerSpawner.volumes = {"jupyterhub-user-{username}": "/home/jovyan/work"}
    c.LabvaultDockerSpawner.store_locations = {"replica-1": "/srv/disk1/labvault"}  # replica-2: as the service reports
    c.DockerSpawner.environment = {"LABVAULT_HUB_SECRET": hub.hub_secret, "HARMLESS": "1",
                                   "SNEAKY": f"x{hub.hub_secret}y"}
    # frank: his facility experiment and the public one; vera (vendor): never a proprietary one
    for user, exids in (("frank", ["NLS-2026-0001", "NLS-2026-0002"]), ("vera", ["NLS-2026-0002"])):
        spawner = LabvaultDockerSpawner(user=MockUser(user), hub=Hub(), config=c)
        spawner.datastore.secret = hub.hub_secret
        spawner.labvault_apply_start(start_answer(hub, user, "python-scientific"))
        assert spawner.image == "quay.io/jupyter/scipy-notebook"
        binds = spawner.volume_binds
        assert binds.pop("jupyterhub-user-" + user) == {"bind": "/home/jovyan/work", "mode": "rw"}
        hosts = {"replica-1": "/srv/disk1/labvault", "replica-2": str(hub.store_dir / "replica-2")}
        expected = {f"{hosts[loc]}/{obj}": {"bind": f"/mnt/labvault/{loc}/{obj}", "mode": "ro"}
                    for loc, obj in stored_objects(hub, exids)}
        assert binds == expected and len(expected) == 2 * len(exids)  # one object each, two replicas
        assert sorted(spawner.volume_mount_points) == sorted(["/home/jovyan/work", *(b["bind"] for b in expected.values())])
        env = spawner.get_env()
        assert env["LABVAULT_DIRECT_READ_ROOT"] == "/mnt/labvault" and env["HARMLESS"] == "1"
        assert "LABVAULT_HUB_SECRET" not in env and "SNEAKY" not in env
        assert env["JUPYTER_IMAGE_SPEC"] == "quay.io/jupyter/scipy-notebook"


def test_docker_refuses_an_image_option_before_asking_anyone(hub):
    from jupyterhub.objects import Hub
    from tornado import web

    from labvault.hub.docker import LabvaultDockerSpawner

    spawner = LabvaultDockerSpawner(user=MockUser("frank"), hub=Hub())
    spawner.datastore.url = "http://127.0.0.1:9/nowhere"  # would fail if it were asked
    with pytest.raises(web.HTTPError) as e:
        asyncio.run(spawner.apply_user_options(spawner, {"environment": "python-scientific", "image": "evil"}))
    assert e.value.status_code == 400 and "'image'" in e.value.log_message


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


def test_kubernetes_pod_mounts_exactly_the_permitted_experiments(hub, tmp_path, monkeypatch):
    """KubeSpawner wants a kube config and a running loop to construct: a config naming no
    reachable cluster is enough, since only the pod manifest is built (as kubespawner's tests do)."""
    from jupyterhub.objects import Hub
    from kubernetes_asyncio.client import ApiClient
    from traitlets.config import Config

    from labvault.hub.kube import LabvaultKubeSpawner

    c = Config()
    c.LabvaultKubeSpawner.store_volumes = {
        "replica-1": {"persistentVolumeClaim": {"claimName": "labvault-replica-1"}},
        "replica-2": {"persistentVolumeClaim": {"claimName": "labvault-replica-2", "readOnly": False}},
    }
    c.KubeSpawner.volumes = [{"name": "home", "emptyDir": {}}]
    c.KubeSpawner.volume_mounts = [{"name": "home", "mountPath": "/home/jovyan"}]
    import kubernetes_asyncio.config.kube_config as kube_config

    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "kubeconfig"))
    answer = start_answer(hub, "bob", "detectorco-suite")

    async def manifest():
        spawner = LabvaultKubeSpawner(user=MockUser("bob"), hub=Hub(), config=c, _mock=True)
        spawner.labvault_apply_start(answer)
        return ApiClient().sanitize_for_serialization(await spawner.get_pod_manifest())

    pod = asyncio.run(manifest())
    container = pod["spec"]["containers"][0]
    assert container["image"] == "detectorco/suite"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["labvault-store-replica-1"]["persistentVolumeClaim"] == {"claimName": "labvault-replica-1",
                                                                            "readOnly": True}
    assert volumes["labvault-store-replica-2"]["persistentVolumeClaim"]["readOnly"] is True
    ours = [m for m in container["volumeMounts"] if m["name"].startswith("labvault-store-")]
    assert {(m["name"].removeprefix("labvault-store-"), m["subPath"]) for m in ours} == \
        stored_objects(hub, ["NLS-2026-0001", "NLS-2026-0002"])  # bob: his role + the public one
    assert all(m["readOnly"] and m["mountPath"] == f"/mnt/labvault/{m['name'].removeprefix('labvault-store-')}/{m['subPath']}"
               for m in ours)
    assert {"name": "home", "mountPath": "/home/jovyan"} in container["volumeMounts"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LABVAULT_ALLOWED_KERNELS"] == "python3" and env["LABVAULT_ENVIRONMENT"] == "detectorco-suite"


def test_hub_internal_spawn_api_needs_the_secret(hub):
    r = hub.http.request("POST", f"{hub.service_url}/api/v1/hub/users/alice/environments/python-scientific/start",
                         headers={"Authorization": f"token {hub.token('alice')}"}, body=b"{}")
    assert r.status == 401
    status, answer = hub_internal(hub, "GET", "/users/vera/experiments?files=1")
    assert status == 200 and [e["exid"] for e in answer["experiments"]] == ["NLS-2026-0002"]  # vendor
    status, answer = hub_internal(hub, "GET", "/users/nobody/environments")
    assert status == 404 and answer["rule"] == "account.state"
    status, answer = hub_internal(hub, "POST", "/users/frank/server-stopped", {"server": "", "lost": "x",
                                                                             "started_at": NOW.isoformat()})
    assert status == 400 and "lost" in answer["reason"]
