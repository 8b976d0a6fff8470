"""Spawn-to-ready: labvault's local spawner against JupyterHub's stock local spawner, one run.

Two real JupyterHubs run side by side on 127.0.0.1 (tests/hubtools.start_hub, node proxy, the
labvault service): one with ``labvault-local`` (form re-validated with the service, the start
decided and audited, environment and state), one with JupyterHub's stock local-process spawner
and no options. Both run the servers as the Hub's OS user with the same command, so the
difference is what labvault adds. Spawns alternate between the two Hubs (``--repeat`` each):
``POST /users/{name}/server`` until the Hub reports the server ready, then it is stopped.

    python benchmarks/bench_spawn.py [--repeat 7] [--json out.json]

Target (issue 5): labvault's median ≤ 1.1 × the stock one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def spawn_to_ready(hub, name: str, options: dict | None, timeout: float = 120) -> float:
    hub.ensure_user(name)
    t0 = time.perf_counter()
    r = hub.hub_request("POST", f"/users/{name}/server", options)
    if r.status not in (201, 202):
        raise RuntimeError(f"spawn {name}: {r.status} {r.data[:300]!r}")
    while time.perf_counter() - t0 < timeout:
        model = json.loads(hub.hub_request("GET", f"/users/{name}").data)["servers"].get("")
        if model and model.get("ready"):
            elapsed = time.perf_counter() - t0
            break
        time.sleep(0.02)
    else:
        raise RuntimeError(f"{name}'s server was not ready after {timeout} s")
    hub.hub_request("DELETE", f"/users/{name}/server")
    while json.loads(hub.hub_request("GET", f"/users/{name}").data)["servers"]:
        time.sleep(0.05)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests"))
    from hubtools import start_hub

    from labvault.datastore import demo, migrate
    from labvault.datastore import operations as ops
    from labvault.datastore.db import make_engine, session_factory

    singleuser = str(Path(sys.executable).parent / "jupyterhub-singleuser")
    common = """
c.Spawner.cmd = [SINGLEUSER]
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
c.Spawner.default_url = "/lab"
c.JupyterHub.load_roles.append({"name": "bench-servers", "services": ["test-admin"],
                                 "scopes": ["admin:servers"]})
"""
    labvault = common + """
c.JupyterHub.spawner_class = "labvault-local"
c.LabvaultLocalSpawner.run_as_hub_user = True
c.LabvaultLocalSpawner.home_root = HOMES
"""
    stock = common + """
from jupyterhub.spawner import SimpleLocalProcessSpawner
c.JupyterHub.spawner_class = SimpleLocalProcessSpawner
c.SimpleLocalProcessSpawner.home_dir_template = HOMES + "/{username}"
c.Spawner.args = ["--allow-root"] if __import__("os").getuid() == 0 else []
"""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    hubs = {}
    tmp = tempfile.mkdtemp(prefix="lv-bench-spawn-")  # kept when something fails (the Hubs' logs)
    if True:
        try:
            for label, config in (("labvault", labvault), ("stock", stock)):
                work = Path(tmp) / label
                work.mkdir()
                url = f"sqlite:///{work / 'labvault.sqlite'}"
                engine = make_engine(url)
                migrate.upgrade(engine)
                demo.seed(session_factory(engine), ops.Actor(operator="bench"), now=now)
                engine.dispose()
                hubs[label] = start_hub(work, url, now=now,
                                        service_config=config.replace("HOMES", repr(str(work / "homes")))
                                        .replace("SINGLEUSER", repr(singleuser)))
            options = {"labvault": {"environment": "python-scientific"}, "stock": None}
            for label in hubs:  # warm-up: imports, first JupyterLab build lookups
                spawn_to_ready(hubs[label], "carol", options[label])
            times: dict[str, list[float]] = {label: [] for label in hubs}
            for i in range(args.repeat):
                for label in (list(hubs) if i % 2 == 0 else list(hubs)[::-1]):  # alternate who goes first
                    times[label].append(spawn_to_ready(hubs[label], "carol", options[label]))
            # what labvault adds to a spawn: one Hub-internal request (decide, list, audit)
            hub = hubs["labvault"]
            start_ms = []
            for _ in range(50):
                t0 = time.perf_counter()
                r = hub.http.request("POST", f"{hub.service_url}/api/v1/hub/users/carol/environments/"
                                     "python-scientific/start", body=b'{"server": ""}',
                                     headers={"Authorization": f"labvault-hub {hub.hub_secret}"})
                start_ms.append(1000 * (time.perf_counter() - t0))
                assert r.status == 200, r.data[:200]
        finally:
            for hub in hubs.values():
                hub.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {label: statistics.median(v) for label, v in times.items()}
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load": os.getloadavg()[0]},
        "repeat": args.repeat,
        "seconds": times,
        "median": med,
        "ratio": med["labvault"] / med["stock"],
        "start_request_ms": {"median": statistics.median(start_ms), "max": max(start_ms)},
    }
    print(f"spawn-to-ready, median of {args.repeat} (alternating, one warm-up each):")
    for label in ("stock", "labvault"):
        v = times[label]
        print(f"  {label:<9} {med[label]:.3f} s   (min {min(v):.3f}, max {max(v):.3f})")
    print(f"  ratio labvault/stock: {result['ratio']:.3f}   (target <= 1.1)")
    print(f"  labvault's own step (the start decision through the service): median "
          f"{statistics.median(start_ms):.1f} ms of 50")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
