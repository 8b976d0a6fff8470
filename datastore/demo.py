"""The demo world of `make run`: two institutions and a vendor, a PI, scientists, facility
staff, an admin, a proprietary and an open experiment, licensed and free environments."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from labvault import policies as p

from . import operations as ops
from .access import load_subject
from .models import Environment, Institution, User

UNI, FACILITY, VENDOR = "Alpine University", "Nordic Light Source", "DetectorCo"

USERS = [
    # name, display name, institution, department, extra
    ("admin", "Ada Admin", UNI, None, {"admin": True}),
    ("alice", "Alice Aebi", UNI, "Structural Biology",
     {"institutional_email": "alice@alpine-uni.example", "verified_institutional_email": True}),
    ("bob", "Bob Brunner", UNI, "Structural Biology", {}),
    ("carol", "Carol Chen", UNI, "Materials Science", {}),
    ("frank", "Frank Fischer", FACILITY, "Beamline Science", {}),
    ("vera", "Vera Vogt", VENDOR, None, {}),
]


def seed(factory, actor: ops.Actor, now: datetime | None = None) -> bool:
    """Create the demo world unless it exists. Returns True when it was created now."""
    now = now or datetime.now(timezone.utc)
    with factory() as s:
        if s.scalar(select(Institution.id).where(Institution.name == UNI)):
            return False
    ops.add_institution(factory, actor, UNI, domains=["alpine-uni.example"], idps=["alpine-uni.example"])
    ops.add_institution(factory, actor, FACILITY, domains=["nls.example"], idps=["nls.example"], facility=True)
    ops.add_institution(factory, actor, VENDOR, domains=["detectorco.example"], vendor=True)
    for inst, dept in ((UNI, "Structural Biology"), (UNI, "Materials Science"), (FACILITY, "Beamline Science")):
        ops.add_department(factory, actor, dept, inst)
    for name, display, inst, dept, extra in USERS:
        domain = {UNI: "alpine-uni.example", FACILITY: "nls.example", VENDOR: "detectorco.example"}[inst]
        ops.add_user(factory, actor, name, institution=inst, display_name=display,
                     email=f"{name}@{domain}", department=dept, **extra)
    ops.add_licence(factory, actor, UNI, "detectorco-analysis", valid_until=now + timedelta(days=365), seats=20)
    ops.add_environment(factory, actor, "python-scientific", display_name="Python (NumPy, h5py)",
                        kernelspec="python3", image="quay.io/jupyter/scipy-notebook")
    ops.add_environment(factory, actor, "detectorco-suite", display_name="DetectorCo analysis suite",
                        kernelspec="python3", image="detectorco/suite", licences=["detectorco-analysis"])
    ops.add_environment(factory, actor, "alpine-pipeline", display_name="Alpine in-house pipeline",
                        kernelspec="python3", image="alpine/pipeline", proprietary=True, institution=UNI)
    ops.add_project(factory, actor, "Membrane Proteins", UNI, pi="alice")
    ops.add_experiment(factory, actor, "NLS-2026-0001", pi="alice", title="Lysozyme soaking series",
                       facility="NLS X06SA", start_at=now - timedelta(days=14),
                       end_at=now - timedelta(days=10), department="Structural Biology",
                       projects=["Membrane Proteins"])
    ops.add_experiment(factory, actor, "NLS-2025-0042", pi="alice", title="Detector calibration (ended)",
                       facility="NLS X06SA", start_at=now - timedelta(days=62),
                       end_at=now - timedelta(days=60), department="Structural Biology")
    ops.add_experiment(factory, actor, "NLS-2026-0002", pi="alice", title="Open powder diffraction",
                       facility="NLS X04SA", start_at=now - timedelta(days=30),
                       end_at=now - timedelta(days=29), proprietary=False, department="Structural Biology")
    alice = ops.Actor(user_id=_uid(factory, "alice"))
    ops.publish_experiment(factory, alice, "NLS-2026-0002", now=now)
    ops.grant_role(factory, alice, "NLS-2026-0001", "bob", "writer", now=now)
    for exid in ("NLS-2026-0001", "NLS-2025-0042"):
        ops.grant_role(factory, alice, exid, "frank", "facility_staff", now=now)
    return True


def seed_data(factory, store, frames: int = 24) -> list[str]:
    """Detector-like HDF5 data (uint16 frames, chunked per frame) for the demo experiments,
    ingested through the encrypted store as their PI. Idempotent: stored files are skipped."""
    import tempfile

    import h5py
    import numpy as np

    alice = ops.Actor(user_id=_uid(factory, "alice"))
    rng = np.random.default_rng(2026)
    stored = []
    with tempfile.TemporaryDirectory() as tmp:
        for exid, name in (("NLS-2026-0001", "scan-0001/frames.h5"), ("NLS-2026-0002", "powder/frames.h5")):
            src = f"{tmp}/{exid}.h5"
            yy, xx = np.mgrid[0:256, 0:256]
            ring = np.exp(-((np.hypot(yy - 128, xx - 128) - 60) ** 2) / 40.0)
            with h5py.File(src, "w") as f:
                data = f.create_dataset("entry/data/data", shape=(frames, 256, 256), dtype="uint16",
                                        chunks=(1, 256, 256))
                for i in range(frames):
                    data[i] = (rng.poisson(5, (256, 256)) + 1000 * ring * (1 + i / frames)).astype("uint16")
                f.create_group("entry/instrument/detector").attrs["description"] = "demo 256x256 pixel detector"
            result = store.ingest_file(alice, exid, src, name)
            if not result.skipped:
                stored.append(f"{exid}/{name}")
    return stored


#: The demo users' password (the embedded default on loopback only; change it for anything else).
DEMO_PASSWORD = "labvault-demo"


def seed_passwords(factory, password: str = DEMO_PASSWORD, now: datetime | None = None) -> list[str]:
    """Give the demo users local-account passwords where they have none yet."""
    from .accounts import Accounts
    from .models import LocalCredential

    now = now or datetime.now(timezone.utc)
    accounts, done = Accounts(factory), []
    with factory() as s:
        names = [u.name for u in s.scalars(select(User).order_by(User.name))
                 if u.name in {n for n, *_ in USERS} and s.get(LocalCredential, u.id) is None]
    for name in names:
        accounts.set_password(name, password, now)
        done.append(name)
    return done


def _uid(factory, name: str) -> int:
    with factory() as s:
        return ops.get_user(s, name).id


def print_world(factory, created: bool, now: datetime | None = None) -> None:
    now = now or datetime.now(timezone.utc)
    print("labvault demo world " + ("created" if created else "already present") + ":")
    with factory() as s:
        envs = s.scalars(select(Environment).order_by(Environment.name)).all()
        for user in s.scalars(select(User).order_by(User.name)):
            exps = ops.list_visible_experiments(s, user.name, now)
            subject = load_subject(s, user, now)
            usable = [
                e.name for e in envs
                if p.decide(subject, "use", p.Environment(e.id, e.name, frozenset(e.licences),
                                                          e.proprietary, e.institution_id), now).allowed
            ]
            inst = user.institution.name if user.institution else "-"
            print(f"  {user.name:<6} {user.display_name:<14} {inst:<20} "
                  f"experiments: {', '.join(e.exid for e in exps) or '-'}")
            print(f"  {'':<6} {'':<14} {'':<20} environments: {', '.join(usable) or '-'}")
