"""API fuzzing: schemathesis against the service's OpenAPI document, with real tokens of the
demo users (alice PI, bob writer, carol, frank facility staff, vera vendor) through a real Hub.

Every generated request (valid and invalid data, path parameters steered towards the world's
real experiments, files, users and shares) is sent with one user's token, and its answer must

- never be a 5xx, and match the document (status, content type, headers, JSON schema);
- leak nothing of another user: nothing of a proprietary experiment the caller may not read
  (its title, its files' identifiers or bytes; vera never gets anything of one), no other
  user's private e-mail, ORCID, phone, institutional e-mail or full IP, no personal file of
  someone else that was not shared with the caller;
- not reveal existence: asking for a proprietary experiment one may not read, or for someone's
  personal file that was not shared, answers exactly what asking for one that does not exist
  answers (a twin request with an unknown name is sent and compared).

``make test`` runs a small deterministic set (derandomized, ``LABVAULT_FUZZ_EXAMPLES`` cases
per operation, default 5). ``make soak`` runs ≥ 1,000 random cases per database
(``LABVAULT_FUZZ_EXAMPLES=40 LABVAULT_FUZZ_SEED=random``) and prints the count; see
docs/hardening.md. The end of the module also holds the token tests the service's own tests
do not: a token acts as its owner only, whatever the request claims, and a revoked token stops
working within the service's token cache time.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import schemathesis
from conftest import fresh_database_url
from hubtools import start_hub
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import or_, select, update

from labvault.datastore import demo
from labvault.datastore import operations as ops
from labvault.datastore.db import make_engine, session_factory
from labvault.datastore.models import (
    Experiment,
    PersonalShare,
    RoleGrant,
    Share,
    StoredFile,
    User,
    UserState,
)
from labvault.datastore.store import ChunkStore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
OPENAPI = ROOT / "datastore" / "service" / "openapi.yaml"
NOW = datetime.now(timezone.utc).replace(microsecond=0)
USERS = ("alice", "bob", "carol", "frank", "vera")
EXAMPLES = int(os.environ.get("LABVAULT_FUZZ_EXAMPLES", "5"))
SEED = os.environ.get("LABVAULT_FUZZ_SEED", "")  # "" derandomized (make test), "random", or a number
UNKNOWN_EXID = "NLS-1999-9999"
UNKNOWN_PATH = "no-such-dir/no-such-file.bin"

SCHEMA = schemathesis.openapi.from_path(str(OPENAPI))
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
# "Every answer matches the document" (a 5xx is checked first, with its own message)
CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
STATS: dict[str, Counter] = {}  # per database: generated cases, existence twins, statuses


# --- the world: the demo world plus secrets to watch for -----------------------------------
def marker(kind: str) -> bytes:
    return f"LV-{kind}-{secrets.token_hex(8)}".encode()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def hub(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    url = fresh_database_url(request, request.param, workdir)
    engine = make_engine(url)
    factory = session_factory(engine)
    demo.seed(factory, ops.Actor(operator="test"), now=NOW)
    with factory.begin() as s:  # private data of each user that others must never see
        s.execute(update(User).where(User.name == "alice").values(orcid="0000-0002-1825-0097"))
        s.execute(update(User).where(User.name == "bob").values(phone="+41 44 555 01 23"))
        s.execute(update(User).where(User.name == "carol").values(last_login_ip="203.0.113.77",
                                                                   institutional_email="carol.chen@alpine-uni.example"))
        s.execute(update(User).where(User.name == "frank").values(email_visible=True))  # allowed to be shown
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    (data / "labvault_config.py").write_text(
        "c.DatastoreService.rate_limit_per_second = 0.0\n"  # fuzzing is not harvesting
        "c.DatastoreService.max_upload_size = 1024 * 1024\n"
        "c.DatastoreService.token_cache_seconds = 2\n"  # the revoked-token test waits this long
        f"c.DatastoreService.direct_read_root = {str(data / 'store')!r}\n"  # leases are on
    )
    store = ChunkStore(sessions=factory, data_dir=str(data))
    store.prepare_locations()
    with factory() as s:
        alice_id = s.scalar(select(User.id).where(User.name == "alice"))
    secret_bytes: dict[bytes, tuple[str, str]] = {}  # content marker -> (kind, whose)
    for exid, path in (("NLS-2026-0001", "scan/frames.h5"), ("NLS-2025-0042", "calib/dark.bin"),
                       ("NLS-2026-0002", "powder/open.txt")):
        m = marker("exp")
        secret_bytes[m] = ("experiment", exid)
        src = workdir / "src.bin"
        src.write_bytes(b"header " + m + b" " * 300 + m + b"\n")
        store.ingest_file(ops.Actor(user_id=alice_id), exid, src, path, now=NOW)
    h = start_hub(workdir, url, now=NOW)
    h.kind, h.factory, h.secret_bytes, h.tokens = request.param, factory, secret_bytes, {}
    h.base = h.service_url + "/api/v1"
    h.session = requests.Session()
    for name in USERS:
        h.tokens[name] = h.token(name)
    # personal files: one private to each user; carol shares one file with bob
    for name in USERS:
        for path in (f"private/{name}-notes.txt", f"share/{name}-for-others.txt"):
            m = marker("personal")
            secret_bytes[m] = ("personal", f"{name}:{path}")
            r = h.session.put(f"{h.base}/personal/files/{path}", data=b"mine: " + m,
                              headers={"Authorization": f"token {h.tokens[name]}"})
            assert r.status_code == 201, r.text
    r = h.session.post(f"{h.base}/personal/shares", json={"path": "share/carol-for-others.txt", "user": "bob"},
                       headers={"Authorization": f"token {h.tokens['carol']}"})
    assert r.status_code == 201, r.text
    yield h
    h.stop()
    engine.dispose()
    counts = STATS.get(request.param, Counter())
    line = (f"fuzz[{request.param}]: {counts['cases']} generated cases, {counts['twins']} existence twins, "
            f"statuses {dict(sorted((k, v) for k, v in counts.items() if k.isdigit()))}")
    print("\n" + line)
    report = os.environ.get("LABVAULT_FUZZ_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps({"db": request.param, "examples_per_operation": EXAMPLES,
                                "seed": SEED or "derandomized", **counts}) + "\n")


# --- what each user may see, read from the database around each request --------------------
class Snapshot:
    """The world as the oracle needs it: what ``user`` may read, and the secrets of others."""

    def __init__(self, hub, user: str):
        with hub.factory() as s:
            users = {u.name: u for u in s.scalars(select(User))}
            me = users[user]
            self.readable = {e.exid for e in ops.list_visible_experiments(s, user, NOW)} \
                if me.state == UserState.active else set()
            self.experiments = {e.exid: e for e in s.scalars(select(Experiment))}
            # proprietary experiments the user may not read: nothing of their data reaches them;
            # of the ones they never had a role on or a share of, not even that they exist
            hidden = {x for x, e in self.experiments.items() if e.proprietary and x not in self.readable}
            hidden_ids = {self.experiments[x].id for x in hidden}
            related = set(s.scalars(select(RoleGrant.experiment_id).where(RoleGrant.user_id == me.id))) | \
                set(s.scalars(select(Share.experiment_id).where(or_(Share.shared_with_id == me.id,
                                                                   Share.requested_by_id == me.id))))
            self.unreadable = hidden
            self.hidden = {x for x in hidden if self.experiments[x].id not in related}
            self.hidden_text: set[str] = set()  # strings that must never reach the user
            for x in self.hidden:
                if len(self.experiments[x].title or "") >= 8:
                    self.hidden_text.add(self.experiments[x].title)
            files = s.scalars(select(StoredFile)).all()
            shared = {(o, p) for o, p in s.execute(
                select(PersonalShare.owner_id, PersonalShare.path).where(
                    PersonalShare.shared_with_id == me.id, PersonalShare.revoked_at.is_(None)))}
            self.shared_to_me: set[str] = set()
            for f in files:
                if f.experiment_id in hidden_ids:
                    self.hidden_text.add(f.uuid)
                elif f.owner_id is not None and f.owner_id != me.id:
                    if any(o == f.owner_id and (f.path == p or f.path.startswith(p + "/")) for o, p in shared):
                        self.shared_to_me.add(f"{users_by_id(users)[f.owner_id]}:{f.path}")
                    else:
                        self.hidden_text.add(f.uuid)
            for name, u in users.items():
                if name == user:
                    continue
                private = [u.orcid, u.phone, u.institutional_email, u.last_login_ip]
                if not (u.email_visible or me.is_admin):
                    private.append(u.email)
                self.hidden_text.update(v for v in private if v and len(v) >= 6)
            self.personal_paths = {(n, p) for n, p in s.execute(
                select(User.name, StoredFile.path).join(User, User.id == StoredFile.owner_id)
                .where(StoredFile.deleted_at.is_(None)))}
            self.share_ids = [i for (i,) in s.execute(select(Share.id))]
            self.personal_share_ids = [i for (i,) in s.execute(select(PersonalShare.id))]
        self.user = user


def users_by_id(users: dict[str, User]) -> dict[int, str]:
    return {u.id: n for n, u in users.items()}


def own_events(user: str, hidden: set[str], payload, found: list[str]):
    """The payload without the user's own audit events that name a hidden experiment (their own
    requests, echoed by their access log or export); each must show the unknown exID's answer."""
    if isinstance(payload, list):
        return [own_events(user, hidden, x, found) for x in payload]
    if not isinstance(payload, dict):
        return payload
    if payload.get("actor") == user and {"target", "rule", "reason", "allowed"} <= set(payload):
        for exid in hidden:
            if exid in str(payload["target"]):
                shown = (payload["allowed"], payload["rule"], payload["reason"])
                if shown != (False, "default.deny", f"no experiment {exid!r}"):
                    found.append(f"own log shows {shown} for hidden {exid}")
                return None
    return {k: own_events(user, hidden, v, found) for k, v in payload.items()}


def leaked(hub, before: Snapshot, after: Snapshot, request_text: str, body: bytes) -> list[str]:
    """What of others' data the answer holds (empty: nothing)."""
    found: list[str] = []
    text = body.decode("utf-8", "replace")
    try:
        text = json.dumps(own_events(before.user, before.hidden & after.hidden, json.loads(body), found))
    except ValueError:
        pass
    for secret in before.hidden_text & after.hidden_text:  # hidden before and after the request
        if secret in text:
            found.append(f"private value {secret!r}")
    for exid in before.hidden & after.hidden:
        if re.search(rf"\b{re.escape(exid)}\b", text) and exid not in request_text:
            found.append(f"hidden experiment {exid}")
    for m, (kind, whose) in hub.secret_bytes.items():
        if m not in body:
            continue
        if kind == "experiment" and whose in before.unreadable and whose in after.unreadable:
            found.append(f"bytes of a file of {whose}")
        if kind == "personal":
            owner = whose.split(":")[0]
            if owner != before.user and whose not in before.shared_to_me | after.shared_to_me:
                found.append(f"bytes of {whose}")
    return found


# --- steering: real names in path parameters and bodies, some of the time -----------------
def steered_values(world: Snapshot) -> dict[str, list]:
    exids = sorted(world.experiments) + [UNKNOWN_EXID]
    paths = ["scan/frames.h5", "calib/dark.bin", "powder/open.txt", "private/carol-notes.txt",
             "share/carol-for-others.txt"]
    return {
        "exid": exids,
        "user": list(USERS) + ["admin", "nobody-here"],
        "name": list(USERS) + ["Structural Biology", "Membrane Proteins", "Beamline Science"],
        "owner": list(USERS),
        "path": paths,
        "share_id": [str(i) for i in world.share_ids + world.personal_share_ids] or ["1"],
        "result_set_id": ["1", "2"],
        "pi": list(USERS),
    }


#: Operations whose path parameters are never steered: they destroy what the oracle watches.
NO_STEERING = {("DELETE", "/experiments/{exid}/files/{path}"), ("DELETE", "/personal/files/{path}")}
#: Body fields steered towards real values (never ``confirm``: that would close accounts).
STEERED_BODY = ("exid", "user", "pi", "path")


def draw_case(data, operation, world: Snapshot):
    values = steered_values(world)
    fixed = {}
    if (operation.method.upper(), operation.path) not in NO_STEERING:
        for param in operation.path_parameters:
            if param.name in values and data.draw(st.booleans(), label=f"steer {param.name}"):
                fixed[param.name] = data.draw(st.sampled_from(values[param.name]), label=param.name)
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    mode = data.draw(st.sampled_from(modes), label="mode")
    case = data.draw(operation.as_strategy(generation_mode=mode, path_parameters=fixed or None), label="case")
    if isinstance(case.body, dict) and mode == GenerationMode.POSITIVE:
        for name in STEERED_BODY:
            if name in case.body and data.draw(st.booleans(), label=f"steer body {name}"):
                case.body[name] = data.draw(st.sampled_from(values[name]), label=f"body {name}")
    return case, mode


def send(hub, user: str, kwargs: dict) -> requests.Response:
    kwargs = {**kwargs, "headers": {**(kwargs.get("headers") or {}), "Authorization": f"token {hub.tokens[user]}"}}
    kwargs.setdefault("timeout", 30)
    kwargs.setdefault("allow_redirects", False)
    return hub.session.request(**kwargs)


def normalised(r: requests.Response, unknown: str, real: str):
    body = r.content.replace(quote(unknown, safe="").encode(), quote(real, safe="").encode())
    body = body.replace(unknown.encode(), real.encode())
    try:
        body = json.loads(body)
    except ValueError:
        pass
    return r.status_code, r.headers.get("X-Labvault-Rule"), body


def existence_twin(hub, user: str, case, kwargs: dict, world: Snapshot, response) -> str | None:
    """For a hidden thing named in the path: the answer must equal the one for an unknown name."""
    params = case.path_parameters or {}
    exid = params.get("exid")
    if exid in world.hidden:
        real, unknown = exid, UNKNOWN_EXID
        old = "/experiments/" + quote(exid, safe="")
    elif "owner" in params and (params.get("owner"), params.get("path")) in world.personal_paths \
            and f"{params['owner']}:{params['path']}" not in world.shared_to_me and params["owner"] != user:
        real, unknown = params["path"], UNKNOWN_PATH
        old = "/" + quote(params["path"], safe="")
    else:
        return None
    url = kwargs["url"]
    if old not in url:
        return None
    new = old.replace(quote(real, safe=""), quote(unknown, safe=""))
    twin = send(hub, user, {**kwargs, "url": url.replace(old, new, 1)})
    STATS.setdefault(hub.kind, Counter())["twins"] += 1
    a, b = normalised(response, real, real), normalised(twin, unknown, real)
    if a != b:
        return (f"{case.operation.label}: {real!r} exists but may not be read, and the answer differs from "
                f"the one for an unknown name:\n  hidden:  {a}\n  unknown: {b}")
    return None


# --- regressions of what the fuzzing found ------------------------------------------------
HIDDEN_PROBES = [
    ("GET", "/experiments/{}", None), ("GET", "/experiments/{}/files", None),
    ("GET", "/experiments/{}/files/calib/dark.bin", None), ("HEAD", "/experiments/{}/files/calib/dark.bin", None),
    ("POST", "/experiments/{}/leases", {"path": "calib/dark.bin"}),
    ("POST", "/experiments/{}/roles", {"user": "carol", "role": "viewer"}),
    ("GET", "/experiments/{}/roles", None), ("GET", "/experiments/{}/activity", None),
    ("GET", "/experiments/{}/retention/status", None), ("GET", "/experiments/{}/audit/verify", None),
    ("POST", "/experiments/{}/archive", None), ("PATCH", "/experiments/{}", {"title": "mine now"}),
]


def test_a_hidden_experiment_answers_like_an_unknown_one(hub):
    """Regression (found by the fuzzing): refusing a proprietary experiment named its rule
    (``proprietary.assigned_only``, ``vendor.never``) and exID in the 404, so anyone could tell
    which exIDs exist and are proprietary. Now the answer is the unknown experiment's; the audit
    event keeps the real rule."""
    for user in ("bob", "carol", "vera"):  # none of them ever had a role on NLS-2025-0042
        for method, template, body in HIDDEN_PROBES:
            real = api(hub, hub.tokens[user], method, template.format("NLS-2025-0042"), json=body)
            unknown = api(hub, hub.tokens[user], method, template.format(UNKNOWN_EXID), json=body)
            assert real.status_code == 404, (user, method, template, real.text)
            assert normalised(real, "NLS-2025-0042", "NLS-2025-0042") == \
                normalised(unknown, UNKNOWN_EXID, "NLS-2025-0042"), (user, method, template)
    # nor does one's own access log (or export) tell the two apart: the unknown exID's requests
    # are refusals too, and a hidden one shows as it was answered
    for user in ("bob", "vera"):
        events = api(hub, hub.tokens[user], "GET", "/me/access-log?limit=1000").json()["events"]
        exported = api(hub, hub.tokens[user], "GET", "/me/export").json()["activity"]
        for log in (events, exported):
            def seen(exid, log=log):
                return sorted((e["action"], e["target"].replace(exid, "X"), e["allowed"], e["rule"],
                               e["reason"].replace(exid, "X")) for e in log if exid in e["target"])
            assert seen("NLS-2025-0042") == seen(UNKNOWN_EXID) != [], user
    with hub.factory() as s:
        from labvault.datastore.models import AuditEvent

        ev = s.scalars(select(AuditEvent).where(AuditEvent.actor == "vera",
                                                AuditEvent.target == "experiment:NLS-2025-0042")
                       .order_by(AuditEvent.seq.desc())).first()
    assert (ev.allowed, ev.rule) == (False, "vendor.never")
    # who had a role is told why (frank's facility window ended 30 days after the end)
    r = api(hub, hub.tokens["frank"], "GET", "/experiments/NLS-2025-0042")
    assert r.status_code == 404 and r.json()["rule"] == "facility.access_window"


def test_numbers_out_of_range_are_refused_not_failed(hub):
    """Regression (found by the fuzzing): ids too large for a database integer (SQLite raised
    OverflowError), Unicode digits such as '²' (``str.isdigit`` is true, ``int`` fails) and an
    unknown role name to revoke answered 500. Now they are an unknown id (404) or bad input
    (400), as JSON."""
    alice = hub.tokens["alice"]
    for method, path in (("POST", "/shares/10000000000000000000/confirm"), ("POST", "/shares/%C2%B2/refuse"),
                         ("POST", "/result-sets/99999999999999999999/publish"), ("POST", "/result-sets/%C2%B2/publish"),
                         ("DELETE", "/personal/shares/10000000000000000000"), ("DELETE", "/personal/shares/%C2%B2")):
        r = api(hub, alice, method, path)
        assert r.status_code in (400, 404), (method, path, r.status_code, r.text)
        assert set(r.json()) == {"error", "rule", "reason"}
    # an unknown role to revoke (Role('0') raised ValueError)
    r = api(hub, alice, "DELETE", "/experiments/NLS-2026-0001/roles/bob?role=0")
    assert r.status_code == 400 and "unknown role" in r.json()["reason"], r.text
    assert api(hub, hub.tokens["bob"], "GET", "/experiments/NLS-2026-0001").status_code == 200  # still his
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(hub.base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("PUT", u.path + "/personal/files/x.bin")
    conn.putheader("Authorization", f"token {alice}")
    conn.putheader("Content-Length", "\u00b2".encode("utf-8"))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status in (400, 411), (r.status, r.read())
    conn.close()


# --- tokens: the service's own tests cover forged, expired, other service's, too few scopes --
def api(hub, token, method, path, **kw):
    return hub.session.request(method, hub.base + path, headers={"Authorization": f"token {token}", **kw.pop("headers", {})},
                               timeout=30, **kw)


def test_a_token_acts_as_its_owner_only(hub):
    """Nothing in a request makes bob's token act for alice: not headers a proxy might set, not
    query parameters, not a second Authorization header, not another user's name in the path."""
    bob = hub.tokens["bob"]
    claims = [{"X-Forwarded-User": "alice"}, {"X-Remote-User": "alice"}, {"REMOTE_USER": "alice"},
              {"JupyterHub-User": "alice"}, {"X-Labvault-User": "alice"}]
    for headers in claims:
        r = api(hub, bob, "GET", "/me", headers=headers)
        assert r.status_code == 200 and r.json()["name"] == "bob", headers
    for query in ("?user=alice", "?name=alice", "?as=alice", "?token=" + hub.tokens["alice"][:4]):
        r = api(hub, bob, "GET", "/me" + query)
        assert r.json()["name"] == "bob", query
    # two Authorization headers, bob's first: whichever the service reads, it is one owner's
    from urllib3 import HTTPHeaderDict

    two = HTTPHeaderDict()
    two.add("Authorization", f"token {bob}")
    two.add("Authorization", f"token {hub.tokens['alice']}")
    r = hub.http.request("GET", hub.base + "/me", headers=two)
    assert r.status in (401, 403) or json.loads(r.data)["name"] == "bob", r.data
    # alice's things, named explicitly, with bob's token
    assert api(hub, bob, "GET", "/users/alice/access-log").status_code == 403
    assert api(hub, bob, "GET", "/experiments/NLS-2025-0042").status_code == 404  # hers, proprietary
    r = api(hub, bob, "GET", "/personal/files/private/alice-notes.txt")
    assert r.status_code == 404  # his own repository has no such file
    r = api(hub, bob, "GET", "/shared-with-me/alice/private/alice-notes.txt")
    assert r.status_code == 404 and r.json()["rule"] == "user.own_data"
    r = api(hub, bob, "POST", "/me/close", json={"confirm": "alice"})
    assert r.status_code == 400  # closing is for one's own account, named as oneself
    with hub.factory() as s:
        assert s.scalar(select(User.state).where(User.name == "alice")) == UserState.active
    # the token cookie of the Hub is not a way in either: the service reads the token only
    r = hub.session.get(hub.base + "/me", cookies={"jupyterhub-session-id": "x", "_xsrf": "y"}, timeout=30)
    assert r.status_code == 401


def test_a_revoked_token_stops_working(hub):
    """Regression: the service trusted HubAuth's cache of the Hub's answers for its default five
    minutes, so a token the Hub revoked (an admin removed it, a server stopped) still read data.
    Now it is refused within DatastoreService.token_cache_seconds (here 2, by default 10)."""
    from traitlets import TraitError

    from labvault.datastore.service.app import DatastoreService

    assert DatastoreService().token_cache_seconds == 10
    with pytest.raises(TraitError):
        DatastoreService(token_cache_seconds=0)  # HubAuth would read 0 as "forever"
    token = hub.token("carol")
    assert api(hub, token, "GET", "/me").status_code == 200  # now in the service's cache
    r = hub.hub_request("GET", "/users/carol/tokens")
    for t in json.loads(r.data)["api_tokens"]:
        assert hub.hub_request("DELETE", f"/users/carol/tokens/{t['id']}").status in (200, 204)
    revoked = time.monotonic()
    while (status := api(hub, token, "GET", "/me").status_code) == 200 and time.monotonic() - revoked < 15:
        time.sleep(0.25)
    assert status == 401, "a revoked token was still accepted 15 s later"
    assert time.monotonic() - revoked < 2 + 2  # the cache time, plus slack for this machine
    hub.tokens["carol"] = hub.token("carol")


# --- the fuzzing itself (after the tests above, which need the world as seeded) -----------
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_fuzz_operation(hub, operation):
    """Generated requests of one operation, each as one of the demo users."""
    base = hub.base
    stats = STATS.setdefault(hub.kind, Counter())

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED == "",
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink],
              print_blob=True)
    @given(data=st.data())
    def run(data):
        user = data.draw(st.sampled_from(USERS), label="user")
        before = Snapshot(hub, user)
        case, mode = draw_case(data, operation, before)
        kwargs = case.as_transport_kwargs(base_url=base)
        response = send(hub, user, kwargs)
        stats["cases"] += 1
        stats[str(response.status_code)] += 1
        assert response.status_code < 500, (
            f"{user}: {case.operation.label} answered {response.status_code}: {response.text[:500]}\n"
            f"{case.as_curl_command(base_url=base)}")
        case.validate_response(response, checks=CHECKS)
        after = Snapshot(hub, user)
        request_text = " ".join([kwargs["url"], json.dumps(kwargs.get("json"), default=str),
                                 str(kwargs.get("params") or ""), repr(kwargs.get("data"))[:2000]])
        found = leaked(hub, before, after, request_text, response.content)
        assert not found, f"{user}: {case.operation.label} answered {response.status_code} with {found}"
        problem = existence_twin(hub, user, case, kwargs, before, response)
        assert problem is None, problem

    if SEED not in ("", "random"):
        from hypothesis import seed

        run = seed(int(SEED))(run)
    run()
