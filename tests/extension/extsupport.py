"""Helpers of the extension tests: the seeded files, the shipped config, audit counts.

(A module of its own name: ``from conftest import …`` is ambiguous with two conftest.py files.)
"""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import h5py
import nbformat
import numpy as np
from sqlalchemy import func, select

from labvault.datastore import operations as ops
from labvault.datastore.models import AuditEvent, User
from labvault.datastore.store import ChunkStore

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
SHIPPED_CONFIG = ROOT / "extension" / "jupyter-config" / "jupyter_server_config.d" / "labvault.json"
NOW = datetime.now(timezone.utc).replace(microsecond=0)


def frames() -> np.ndarray:
    return np.arange(12 * 64 * 64, dtype=np.uint16).reshape(12, 64, 64)


def make_h5(path: Path) -> None:
    """A detector-like file: groups, a chunked dataset, attributes, links, NaNs, a string."""
    with h5py.File(path, "w") as f:
        entry = f.create_group("entry")
        entry.attrs["title"] = "lysozyme soak 3"
        entry.attrs["energy_kev"] = 12.4
        entry.attrs["shape_hint"] = np.array([12, 64, 64], dtype=np.int32)
        data = entry.create_dataset("data", data=frames(), chunks=(1, 64, 64), compression="gzip")
        data.attrs["units"] = "counts"
        f.create_group("entry/instrument/detector").attrs["description"] = "demo 64x64 detector"
        f["entry/temperature"] = np.array([1.5, np.nan, np.inf, 3.0], dtype=">f8")
        f["entry/sample"] = "lysozyme"
        f["entry/link"] = h5py.SoftLink("/entry/data")
        f["entry/broken"] = h5py.SoftLink("/entry/nothing")
        f["entry/external"] = h5py.ExternalLink("/etc/passwd", "/x")


NOTEBOOK = nbformat.v4.new_notebook(cells=[
    nbformat.v4.new_markdown_cell("# Soak 3"),
    nbformat.v4.new_code_cell("import numpy as np\nprint(np.pi)"),
])


def seed_files(factory, data_dir: Path, workdir: Path) -> dict[str, bytes]:
    """Files of the demo experiments, stored through the encrypted chunk store as their PI."""
    store = ChunkStore(sessions=factory, data_dir=str(data_dir))
    store.prepare_locations()
    with factory() as s:
        alice = ops.Actor(user_id=s.scalar(select(User.id).where(User.name == "alice")))
    src = workdir / "src"
    src.mkdir()
    make_h5(src / "frames.h5")
    contents = {
        "NLS-2026-0001/scan/frames.h5": (src / "frames.h5").read_bytes(),
        "NLS-2026-0001/notes/analysis.ipynb": nbformat.writes(NOTEBOOK).encode(),
        "NLS-2026-0001/README.txt": b"Soak series 3, beamline X06SA.\n",
        "NLS-2026-0001/.hidden/secret.txt": b"not listed\n",
        "NLS-2026-0002/powder/pattern.txt": b"2theta,counts\n10.0,5\n",
        "NLS-2025-0042/old/calib.txt": b"calibration of an ended experiment\n",
    }
    for i, (key, data) in enumerate(contents.items()):
        exid, path = key.split("/", 1)
        f = src / f"file{i}"
        f.write_bytes(data)
        store.ingest_file(alice, exid, f, path, now=NOW)
    return contents


def user_token(hub, name: str) -> str:
    if name not in hub.tokens:
        hub.tokens[name] = hub.token(name)
    return hub.tokens[name]


def audit_count(hub) -> int:
    with hub.factory() as s:
        return s.scalar(select(func.count()).select_from(AuditEvent))


def shipped_config() -> dict:
    return json.loads(SHIPPED_CONFIG.read_text())


def main_conftest():
    """tests/conftest.py as a module of its own name (``import conftest`` would be ambiguous:
    this directory has a conftest.py too); its fixtures are active here as the parent conftest."""
    name = "labvault_tests_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]
