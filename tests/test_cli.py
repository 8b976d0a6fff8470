"""The admin CLI: the whole management cycle, one-line errors, nothing half-written."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import func, select

from labvault.datastore import audit
from labvault.datastore.cli import main
from labvault.datastore.db import make_engine, session_factory
from labvault.datastore.migrate import head_revision
from labvault.datastore.models import AuditEvent, Experiment, Institution, RoleGrant, User


@pytest.fixture
def cli(db_url, tmp_path, capsys):
    """Run `labvault ARGS` in-process against the test database; returns (exit code, out, err)."""

    def run(*args):
        capsys.readouterr()
        code = 0
        try:
            main([*args, f"--db-url={db_url}", f"--data-dir={tmp_path / 'data'}"])
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def world(cli):
    for args in [
        ("institution", "add", "Alpine University", "--domain", "alpine.example", "--idp", "alpine.example"),
        ("institution", "add", "Light Source", "--domain", "ls.example", "--facility"),
        ("institution", "add", "DetectorCo", "--domain", "dco.example", "--vendor"),
        ("department", "add", "Biology", "--institution", "Alpine University"),
        ("department", "add", "Secret", "--institution", "Alpine University", "--virtual"),
        ("user", "add", "alice", "--institution", "Alpine University", "--department", "Biology",
         "--institutional-email", "alice@alpine.example", "--verified", "--display-name", "Alice A"),
        ("user", "add", "bob", "--institution", "Alpine University", "--department", "Biology"),
        ("user", "add", "carol", "--institution", "Alpine University"),
        ("user", "add", "frank", "--institution", "Light Source"),
        ("user", "add", "vera", "--institution", "DetectorCo"),
        ("project", "add", "Membranes", "--institution", "Alpine University", "--pi", "alice"),
        ("experiment", "add", "LS-2026-1", "--pi", "alice", "--title", "Lysozyme", "--end", "2026-05-01",
         "--facility", "X06SA"),
        ("experiment", "add", "LS-2026-2", "--pi", "alice", "--open", "--project", "Membranes"),
    ]:
        code, out, err = cli(*args)
        assert code == 0, (args, err)
    return cli


def _count(db_url, model):
    engine = make_engine(db_url)
    with session_factory(engine)() as s:
        n = s.scalar(select(func.count()).select_from(model))
    engine.dispose()
    return n


def test_management_cycle(world, db_url):
    cli = world
    code, out, err = cli("role", "grant", "LS-2026-1", "bob", "writer")
    assert code == 0 and "bob is writer on LS-2026-1" in out
    code, out, _ = cli("role", "grant", "LS-2026-1", "frank", "facility_staff")
    assert code == 0
    # facility staff: in on day 29 after the end, out on day 31
    code, out, _ = cli("experiment", "list", "--as", "frank", "--at", "2026-05-30")
    assert "LS-2026-1" in out
    code, out, _ = cli("experiment", "list", "--as", "frank", "--at", "2026-06-01")
    assert "LS-2026-1" not in out
    code, out, _ = cli("experiment", "list", "--as", "bob")
    assert "LS-2026-1" in out and "LS-2026-2" in out  # role + department (open experiment)
    code, out, _ = cli("experiment", "list", "--as", "carol")
    assert "LS-2026" not in out  # other department, no role, nothing public
    code, out, _ = cli("role", "revoke", "LS-2026-1", "bob")
    assert code == 0 and "1 grant(s)" in out
    code, out, _ = cli("experiment", "list", "--as", "bob")
    assert "LS-2026-1" not in out
    code, out, _ = cli("role", "list", "LS-2026-1")
    assert "bob" in out and "writer" in out  # history kept after revocation
    assert _count(db_url, RoleGrant) == 2
    code, out, _ = cli("audit", "verify")
    assert code == 0 and "intact" in out


def test_vendor_cannot_be_assigned_and_refusal_is_audited(world, db_url):
    code, out, err = world("role", "grant", "LS-2026-1", "vera", "viewer")
    assert code == 3
    assert err.count("\n") == 1 and "vendor.never" in err
    assert _count(db_url, RoleGrant) == 0
    engine = make_engine(db_url)
    with session_factory(engine)() as s:
        last = s.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
        assert (last.action, last.allowed, last.rule) == ("role.grant", False, "vendor.never")
        assert audit.verify(s).ok
    engine.dispose()


def test_proprietary_never_public(world):
    code, _, err = world("experiment", "publish", "LS-2026-1")
    assert code == 3 and "proprietary.never_public" in err
    code, out, _ = world("experiment", "publish", "LS-2026-2")
    assert code == 0
    code, out, _ = world("experiment", "list", "--as", "carol")
    assert "LS-2026-2" in out and "LS-2026-1" not in out


def test_pi_needs_verified_institutional_email(world):
    code, _, err = world("experiment", "add", "LS-2026-9", "--pi", "bob")
    assert code == 3 and "pi.verified_institution" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (("user", "add", "Bad Name", "--institution", "Alpine University"), "bad user name"),
        (("user", "add", "dave", "--institution", "Nowhere"), "unknown institution 'Nowhere'"),
        (("user", "add", "dave", "--institution", "Alpine University", "--institutional-email",
          "dave@gmail.example", "--verified"), "is not an address of Alpine University"),
        (("user", "add", "alice", "--institution", "Alpine University"), "exists already"),
        (("institution", "add", "Other", "--domain", "alpine.example"), "already belongs to Alpine University"),
        (("institution", "add", "Other", "--domain", "not a domain"), "not an e-mail domain"),
        (("experiment", "add", "LS 2026", "--pi", "alice"), "bad exID"),
        (("experiment", "add", "LS-2026-3", "--pi", "alice", "--end", "yesterday"), "bad --end"),
        (("experiment", "add", "LS-2026-3", "--pi", "alice", "--start", "2026-02-01", "--end", "2026-01-01"),
         "ends before it starts"),
        (("experiment", "add", "LS-2026-3", "--pi", "alice", "--project", "Nope"), "unknown project"),
        (("role", "grant", "LS-2026-1", "bob", "overlord"), "unknown role"),
        (("role", "grant", "LS-2026-404", "bob", "viewer"), "unknown experiment"),
        (("role", "grant", "LS-2026-1"), "expected EXID USER ROLE"),
        (("role", "revoke", "LS-2026-1", "carol"), "holds no active role"),
        (("licence", "add", "Alpine University", "x", "--seats", "-1"), "--seats"),
        (("environment", "add", "secret", "--image", "x", "--proprietary"), "needs its owning institution"),
        (("user", "state", "bob", "asleep"), "bad state"),
        (("user", "add", "dave", "--bogus"), "bogus"),
        (("frobnicate",), "frobnicate"),
        (("role",), "choose a subcommand"),
    ],
)
def test_bad_input_one_line_nothing_written(world, db_url, args, message):
    before = (_count(db_url, User), _count(db_url, Experiment), _count(db_url, Institution),
              _count(db_url, RoleGrant))
    code, out, err = world(*args)
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and message in lines[-1], err
    assert "Traceback" not in err
    assert (_count(db_url, User), _count(db_url, Experiment), _count(db_url, Institution),
            _count(db_url, RoleGrant)) == before


def test_closing_an_account_removes_roles_keeps_history(world, db_url):
    world("role", "grant", "LS-2026-1", "bob", "viewer")
    code, _, _ = world("user", "state", "bob", "closed")
    assert code == 0
    code, out, _ = world("experiment", "list", "--as", "bob")
    assert "LS-2026" not in out
    code, out, _ = world("role", "list", "LS-2026-1")
    assert "bob" in out  # the revoked grant stays as history


def test_environments_by_licence(world):
    assert world("environment", "add", "free", "--kernelspec", "python3")[0] == 0
    assert world("environment", "add", "suite", "--image", "dco/suite", "--licence", "dco-suite")[0] == 0
    code, out, _ = world("environment", "list", "--as", "bob")
    assert "no: your institution holds no valid licence for dco-suite" in out
    assert world("licence", "add", "Alpine University", "dco-suite", "--valid-until", "2099-01-01")[0] == 0
    code, out, _ = world("environment", "list", "--as", "bob")
    assert "no:" not in out


def test_init_and_missing_database(tmp_path):
    exe = [sys.executable, "-m", "labvault.datastore.cli"]
    data = tmp_path / "var"
    r = subprocess.run([*exe, "user", "list", f"--data-dir={data}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "labvault init" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*exe, "init", f"--data-dir={data}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (data / "labvault.sqlite").exists()
    assert (data.stat().st_mode & 0o777) == 0o700
    assert ((data / "labvault.sqlite").stat().st_mode & 0o777) == 0o600
    r = subprocess.run([*exe, "db", "current", f"--data-dir={data}"], capture_output=True, text=True, timeout=60)
    assert f"current: {head_revision()}" in r.stdout
    r = subprocess.run([*exe, "demo", f"--data-dir={data}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "demo world created" in r.stdout
    r = subprocess.run([*exe, "demo", f"--data-dir={data}"], capture_output=True, text=True, timeout=120)
    assert "already present" in r.stdout


def test_config_file_sets_policy_traits(world, tmp_path):
    """labvault_config.py in the data directory configures the policy; the command line wins."""
    world("role", "grant", "LS-2026-1", "frank", "facility_staff")
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "labvault_config.py").write_text("c.Policy.facility_access_days = 10\n")
    code, out, _ = world("experiment", "list", "--as", "frank", "--at", "2026-05-20")
    assert "LS-2026-1" not in out  # day 19 after the end: past a 10-day window
    code, out, _ = world("experiment", "list", "--as", "frank", "--at", "2026-05-20",
                         "--Policy.facility_access_days=30")
    assert "LS-2026-1" in out
    (data / "labvault_config.py").write_text("c.Policy.facility_access_days = 'ten'\n")
    code, _, err = world("experiment", "list", "--as", "frank")
    assert code == 2 and "bad configuration" in err and "facility_access_days" in err
