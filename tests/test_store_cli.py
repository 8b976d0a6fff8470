"""The store's commands: init, ingest (also killed mid-write), file list/delete, scrub, keys."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select
from store_support import all_files, flip_byte, make_store

from labvault.datastore.cli import main
from labvault.datastore.models import AuditEvent, DataKey, StoredFile


@pytest.fixture
def cli(db_url, tmp_path, capsys):
    def run(*args):
        capsys.readouterr()
        code = 0
        try:
            main([*args, f"--db-url={db_url}", f"--data-dir={tmp_path / 'data'}", "--no-progress"]
                 if args and args[0] == "ingest" else
                 [*args, f"--db-url={db_url}", f"--data-dir={tmp_path / 'data'}"])
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _rows(sessions):
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(StoredFile)), s.scalar(
            select(func.count()).select_from(DataKey))


def test_init_creates_the_master_key_and_the_storage_locations(cli, tmp_path):
    code, out, err = cli("init")
    assert code == 0, err
    data = tmp_path / "data"
    (key_file,) = (data / "keys").glob("*.key")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "keys").stat().st_mode) == 0o700
    assert (data / "store" / "replica-1").is_dir() and (data / "store" / "replica-2").is_dir()
    assert f"master key {key_file.stem}" in out
    code, out, _ = cli("init")  # again: the same key, nothing replaced
    assert code == 0 and [p.stem for p in (data / "keys").glob("*.key")] == [key_file.stem]


def test_ingest_list_scrub_rotate_delete(world, cli, tmp_path):
    assert cli("init")[0] == 0
    run = tmp_path / "run1"
    (run / "sub").mkdir(parents=True)
    (run / "a.h5").write_bytes(os.urandom(3000))
    (run / "sub" / "b.h5").write_bytes(os.urandom(5000))
    single = tmp_path / "notes.txt"
    single.write_text("beam at 12 keV\n")
    code, out, err = cli("ingest", "E-1", str(run), str(single), "--dest-prefix", "raw")
    assert code == 0, err
    assert "stored: E-1/raw/run1/a.h5" in out and "stored: E-1/raw/notes.txt" in out
    assert "3 file(s) stored, 0 already stored" in out
    code, out, err = cli("ingest", "E-1", str(run), str(single), "--dest-prefix", "raw")
    assert code == 0 and "0 file(s) stored, 3 already stored" in out  # resumable
    code, out, _ = cli("file", "list", "E-1")
    assert "raw/run1/sub/b.h5" in out and "replica-1, replica-2" in out
    # damage one replica of one file: scrub repairs it and says so
    store = make_store(world.sessions, tmp_path / "data")
    row = world.row("E-1", "raw/run1/a.h5")
    flip_byte(store.backend("replica-1").root / row.uuid[:2] / f"{row.uuid}.lvc", 200)
    code, out, err = cli("scrub")
    assert code == 0, err
    assert "files: 3" in out and "replicas repaired: 1" in out and "bad chunks: 1" in out
    code, out, _ = cli("keys", "rotate")
    assert code == 0 and "3 data key(s) re-wrapped" in out and "destroyed" in out
    code, out, _ = cli("keys", "list")
    assert "yes" in out and " 3" in out
    code, _, err = cli("file", "delete", "E-1", "raw/notes.txt")
    assert code == 2 and "--reason is required" in err
    code, out, err = cli("file", "delete", "E-1", "raw/notes.txt", "--reason", "typo in notes")
    assert code == 0 and "data key destroyed, chunks removed everywhere" in out
    code, out, _ = cli("file", "list", "E-1")
    assert "deleted" in out and "typo in notes" in out
    code, _, err = cli("file", "delete", "E-1", "raw/run1/a.h5", "--reason", "x", "--by", "writer")
    assert code == 3 and "retention.pi_only" in err
    code, out, _ = cli("audit", "verify")
    assert code == 0 and "intact" in out


def test_scrub_exit_code_when_damage_cannot_be_repaired(world, cli, tmp_path):
    assert cli("init")[0] == 0
    src = tmp_path / "x.bin"
    src.write_bytes(os.urandom(3000))
    assert cli("ingest", "E-1", str(src))[0] == 0
    store = make_store(world.sessions, tmp_path / "data")
    row = world.row("E-1", "x.bin")
    for loc in ("replica-1", "replica-2"):
        flip_byte(store.backend(loc).root / row.uuid[:2] / f"{row.uuid}.lvc", 100)
    code, out, err = cli("scrub", "E-1")
    assert code == 1 and "UNRECOVERABLE E-1/x.bin: chunk(s) 0 fail on every replica" in err


BAD_INPUT = [
    (("ingest", "E-404", "{tmp}/x.bin"), "unknown experiment 'E-404'"),
    (("ingest", "E-1", "{tmp}/missing.bin"), "cannot read {tmp}/missing.bin: No such file or directory"),
    (("ingest", "E-1"), "expected EXID PATH..."),
    (("ingest", "E-1", "{tmp}/x.bin", "--by", "viewer"), "refused by modify.authorised_roles"),
    (("ingest", "E-1", "{tmp}/x.bin", "--ChunkStore.chunk_size=8"), "must be between 64 bytes and 64 MiB"),
    (("ingest", "E-1", "{tmp}/x.bin", "--dest-prefix", "../up"), "bad file path"),
    (("file", "delete", "E-1", "nope.bin", "--reason", "x"), "no file 'nope.bin' in experiment E-1"),
    (("scrub", "E-404"), "unknown experiment 'E-404'"),
]


def test_bad_input_one_line(world, cli, tmp_path):
    assert cli("init")[0] == 0
    (tmp_path / "x.bin").write_bytes(b"x")
    for args, message in BAD_INPUT:  # one world for all cases: each must leave it unchanged
        code, out, err = cli(*[a.format(tmp=tmp_path) for a in args])
        assert code in (2, 3), (args, code, out, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0], (args, err)
        assert _rows(world.sessions) == (0, 0), args


def test_killing_ingest_mid_write_leaves_nothing_visible_and_a_retry_succeeds(world, db_url, tmp_path):
    data = tmp_path / "data"
    store = make_store(world.sessions, data)  # what `labvault init` prepares
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    cmd = [sys.executable, "-m", "labvault.datastore.cli", "ingest", "E-1", str(src),
           f"--db-url={db_url}", f"--data-dir={data}", "--no-progress",
           "--ChunkStore.chunk_size=65536"]
    env = dict(os.environ)
    tmp_dirs = [store.backend(loc).root / ".tmp" for loc in ("replica-1", "replica-2")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    partial = 0
    while time.monotonic() < deadline and proc.poll() is None:
        sizes = [p.stat().st_size for d in tmp_dirs for p in d.iterdir()] if all(d.exists() for d in tmp_dirs) else []
        if sizes and min(sizes) > (4 << 20):  # well into writing both replicas
            os.kill(proc.pid, signal.SIGKILL)
            partial = max(sizes)
            break
        time.sleep(0.002)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.read())
    assert 0 < partial < src.stat().st_size

    # nothing partial is visible: no row, no data key, no object under a final name
    assert _rows(world.sessions) == (0, 0)
    for loc in ("replica-1", "replica-2"):
        root = store.backend(loc).root
        assert [p for p in all_files(root) if ".tmp" not in p.parts] == []
        assert list(store.backend(loc).list()) == []
        assert len(list(store.backend(loc).list_incomplete())) == 1  # the killed upload

    # a retry succeeds and stores the file whole
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1 file(s) stored" in done.stdout
    row = world.row("E-1", "big.bin")
    assert row.checksum == digest and row.size == src.stat().st_size
    with store.open(row.id) as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest
    # scrub clears the killed upload's leftovers once they are old enough
    report = store.scrub(world.op, grace_seconds=0)
    assert report.incomplete_removed == 2 and report.ok
    with world.sessions() as s:
        actions = list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)))
    assert actions.count("file.upload") == 1
