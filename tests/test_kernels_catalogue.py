"""The environment catalogue: manifests parse and validate with clear errors, sync into the
database (added, updated, unchanged, audited; dry runs change nothing), and install kernelspecs
that Jupyter finds."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from labvault import policies as p
from labvault.datastore import demo
from labvault.datastore import operations as ops
from labvault.datastore.access import load_subject
from labvault.datastore.cli import main
from labvault.datastore.models import AuditEvent, Environment, User
from labvault.kernels.catalogue import (
    DEFAULT_CATALOGUE,
    CatalogueError,
    install_kernelspecs,
    load_catalogue,
    load_manifest,
    sync_catalogue,
)

OPERATOR = ops.Actor(operator="test")
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)

GOOD = """
name = "{name}"
display_name = "Suite"
image = "dco/suite:1"
licences = ["dco-suite"]
"""


def write(tmp_path, name, text):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------
def test_shipped_catalogue_is_the_demo_worlds(sessions):
    """The shipped manifests are the demo's environments: syncing after the demo changes nothing."""
    manifests = load_catalogue()
    assert [m.name for m in manifests] == ["alpine-pipeline", "detectorco-suite", "python-scientific"]
    by_name = {m.name: m for m in manifests}
    assert by_name["detectorco-suite"].licences == ("detectorco-analysis",)
    assert by_name["alpine-pipeline"].proprietary and by_name["alpine-pipeline"].institution == demo.UNI
    assert not any(m.public for m in manifests if m.proprietary)
    demo.seed(sessions, OPERATOR, now=NOW)
    report = sync_catalogue(sessions, OPERATOR, manifests, now=NOW)
    assert report.added == [] and report.updated == {}
    assert sorted(report.unchanged) == ["alpine-pipeline", "detectorco-suite", "python-scientific"]


def test_manifest_with_installable_kernelspec(tmp_path):
    path = write(tmp_path, "xrd", """
name = "xrd"

[kernelspec]
name = "xrd-py"
display_name = "XRD (Python)"
language = "python"
argv = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
env = { XRD_MODE = "batch" }
""")
    m = load_manifest(path)
    assert m.image is None and m.kernelspec.name == "xrd-py" and m.display_name == "xrd"
    assert m.operation_fields()["kernelspec"] == "xrd-py"
    assert m.kernelspec.kernel_json()["env"] == {"XRD_MODE": "batch"}


@pytest.mark.parametrize("text, field, message", [
    ("name = 'x'\nimage = ", None, "not valid TOML"),
    ("image = 'a'", "name", "missing"),
    ("name = 'Bad Name'\nimage = 'a'", "name", "bad environment name"),
    ("name = 'other'\nimage = 'a'", "name", "must match the file name"),
    ("name = 'env'", "image", "needs an image, a kernelspec, or both"),
    ("name = 'env'\nimage = 'a'\nlicenses = ['x']", "licenses", "did you mean 'licences'"),
    ("name = 'env'\nimage = 'a'\nlicences = 'x'", "licences", "must be a list"),
    ("name = 'env'\nimage = 'a'\nlicences = ['x', 'x']", "licences", "twice"),
    ("name = 'env'\nimage = 'a'\nproprietary = 'yes'", "proprietary", "true or false"),
    ("name = 'env'\nimage = 'a'\nproprietary = true", "institution", "needs its owning institution"),
    ("name = 'env'\nimage = 'a'\nproprietary = true\ninstitution = 'U'\npublic = true", "public",
     "can never be public"),
    ("name = 'env'\nimage = 'a'\ninstitution = 'U'", "institution", "only proprietary"),
    ("name = 'env'\nimage = 3", "image", "must be a string"),
    ("name = 'env'\nkernelspec = 'bad name'", "kernelspec", "bad kernelspec name"),
    ("name = 'env'\nkernelspec = {name = 'k', language = 'python', argv = ['python']}", "kernelspec.argv",
     "{connection_file}"),
    ("name = 'env'\nkernelspec = {name = 'k', argv = ['python', '{connection_file}']}",
     "kernelspec.language", "missing"),
    ("name = 'env'\nkernelspec = {name = 'k', argvs = []}", "kernelspec.argvs", "did you mean 'argv'"),
])
def test_bad_manifests_name_file_and_field(tmp_path, text, field, message):
    path = write(tmp_path, "env", text)
    with pytest.raises(CatalogueError) as e:
        load_manifest(path)
    assert str(path) in str(e.value) and message in str(e.value)
    assert e.value.field == field
    if field:
        assert f"field {field!r}" in str(e.value)


def test_duplicate_names_and_kernelspecs_across_files(tmp_path):
    (tmp_path / "a").mkdir()
    write(tmp_path / "a", "one", "name = 'one'\nkernelspec = {name = 'k', language = 'python', "
          "argv = ['python', '-f', '{connection_file}']}")
    write(tmp_path / "a", "two", "name = 'two'\nkernelspec = {name = 'k', language = 'python', "
          "argv = ['python', '-f', '{connection_file}']}")
    with pytest.raises(CatalogueError, match=r"two.toml, field 'kernelspec.name'.*also installed by .*one.toml"):
        load_catalogue(tmp_path / "a")
    with pytest.raises(CatalogueError, match="no such catalogue directory"):
        load_catalogue(tmp_path / "missing")


# ----------------------------------------------------------------------------------------
# sync into the database
# ----------------------------------------------------------------------------------------
@pytest.fixture
def institutions(sessions):
    ops.add_institution(sessions, OPERATOR, "Alpine University", domains=["alpine.example"])
    ops.add_institution(sessions, OPERATOR, "Light Source", domains=["ls.example"], facility=True)
    ops.add_licence(sessions, OPERATOR, "Alpine University", "dco-suite", valid_until=NOW + timedelta(days=30))
    ops.add_user(sessions, OPERATOR, "alice", institution="Alpine University")
    ops.add_user(sessions, OPERATOR, "frank", institution="Light Source")
    return sessions


def usable(sessions, user, now=NOW):
    with sessions() as s:
        subject = load_subject(s, s.scalar(select(User).where(User.name == user)), now)
        return sorted(e.name for e in s.scalars(select(Environment)) if p.decide(
            subject, "use", p.Environment(e.id, e.name, frozenset(e.licences), e.proprietary,
                                          e.institution_id, e.public), now).allowed)


def events(sessions, action):
    with sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))


def test_sync_adds_updates_and_reports(institutions, tmp_path):
    sessions = institutions
    cat = tmp_path / "cat"
    cat.mkdir()
    write(cat, "suite", GOOD.format(name="suite"))
    write(cat, "free", "name = 'free'\nkernelspec = 'python3'\npublic = true")
    write(cat, "inhouse", "name = 'inhouse'\nimage = 'alpine/x'\nproprietary = true\n"
          "institution = 'Alpine University'")
    ops.add_environment(sessions, OPERATOR, "by-hand", kernelspec="python3")

    dry = sync_catalogue(sessions, OPERATOR, load_catalogue(cat), dry_run=True, now=NOW)
    assert sorted(dry.added) == ["free", "inhouse", "suite"]
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Environment)) == 1  # the dry run wrote nothing

    report = sync_catalogue(sessions, OPERATOR, load_catalogue(cat), now=NOW)
    assert sorted(report.added) == ["free", "inhouse", "suite"] and report.not_in_catalogue == ["by-hand"]
    assert len(events(sessions, "environment.add")) == 4
    # the policy now decides from what the manifests said
    assert usable(sessions, "alice") == ["by-hand", "free", "inhouse", "suite"]
    assert usable(sessions, "frank") == ["by-hand", "free"]
    assert usable(sessions, "alice", NOW + timedelta(days=31)) == ["by-hand", "free", "inhouse"]  # licence expired

    again = sync_catalogue(sessions, OPERATOR, load_catalogue(cat), now=NOW)
    assert sorted(again.unchanged) == ["free", "inhouse", "suite"] and not again.added and not again.updated
    assert events(sessions, "environment.update") == []  # nothing changed, nothing audited

    # the licence requirement changes: an update, audited with the changed fields
    write(cat, "suite", GOOD.format(name="suite").replace('["dco-suite"]', '["dco-suite", "dco-gpu"]'))
    report = sync_catalogue(sessions, OPERATOR, load_catalogue(cat), now=NOW)
    assert report.updated == {"suite": ["licences"]}
    [event] = events(sessions, "environment.update")
    assert event.target == "environment:suite" and event.details["changed"] == ["licences"]
    assert "suite" not in usable(sessions, "alice")  # Alpine holds no dco-gpu licence

    # a free environment becomes proprietary (and stops being public) in one update
    write(cat, "free", "name = 'free'\nkernelspec = 'python3'\nproprietary = true\ninstitution = 'Light Source'")
    report = sync_catalogue(sessions, OPERATOR, load_catalogue(cat), now=NOW)
    assert sorted(report.updated["free"]) == ["institution_id", "proprietary", "public"]
    assert usable(sessions, "alice") == ["by-hand", "inhouse"]
    assert usable(sessions, "frank") == ["by-hand", "free"]


def test_sync_refuses_unknown_institution_before_writing(institutions, tmp_path):
    cat = tmp_path / "cat"
    cat.mkdir()
    write(cat, "suite", GOOD.format(name="suite"))
    write(cat, "theirs", "name = 'theirs'\nimage = 'x'\nproprietary = true\ninstitution = 'Nowhere U'")
    with pytest.raises(CatalogueError, match=r"theirs.toml, field 'institution': no institution 'Nowhere U'"):
        sync_catalogue(institutions, OPERATOR, load_catalogue(cat), now=NOW)
    with institutions() as s:
        assert s.scalar(select(func.count()).select_from(Environment)) == 0


def test_cli_sync(institutions, db_url, tmp_path, capsys):
    cat = tmp_path / "cat"
    cat.mkdir()
    write(cat, "suite", GOOD.format(name="suite"))
    write(cat, "xrd", "name = 'xrd'\nkernelspec = {name = 'xrd-py', language = 'python', "
          "argv = ['python', '-m', 'ipykernel_launcher', '-f', '{connection_file}']}")

    def run(*args):
        capsys.readouterr()
        try:
            main(["environment", "sync", *args, f"--db-url={db_url}", f"--data-dir={tmp_path / 'data'}"])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        return (code, *capsys.readouterr())

    code, out, _ = run(f"--catalogue={cat}", "--dry-run")
    assert code == 0 and "'suite' would be added" in out and "'xrd' would be added" in out
    code, out, _ = run(f"--catalogue={cat}", f"--kernels-dir={tmp_path / 'share'}")
    assert code == 0 and "'suite' added" in out
    assert (tmp_path / "share" / "kernels" / "xrd-py" / "kernel.json").is_file()
    code, out, _ = run(f"--catalogue={cat}")
    assert code == 0 and "'suite' unchanged" in out
    write(cat, "broken", "name = 'broken'\nimage = 'x'\nlicenses = ['y']")
    code, out, err = run(f"--catalogue={cat}")
    assert code == 2 and "broken.toml, field 'licenses': unknown field (did you mean 'licences'?)" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_installed_kernelspecs_are_found_by_jupyter(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    cat = tmp_path / "cat"
    cat.mkdir()
    shutil.copy(DEFAULT_CATALOGUE / "python-scientific.toml", cat)  # a name only: nothing to install
    write(cat, "xrd", "name = 'xrd'\nkernelspec = {name = 'xrd-py', display_name = 'XRD', language = 'python', "
          "argv = ['python', '-m', 'ipykernel_launcher', '-f', '{connection_file}']}")
    written = install_kernelspecs(load_catalogue(cat), tmp_path / "share")
    assert [w.parent.name for w in written] == ["xrd-py"]
    spec = json.loads(written[0].read_text())
    assert spec["metadata"]["labvault_environment"] == "xrd"
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share"))
    found = KernelSpecManager().get_kernel_spec("xrd-py")
    assert found.display_name == "XRD" and found.language == "python"
