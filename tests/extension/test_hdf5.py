"""HDF5 in the file browser: the h5grove-compatible endpoints describe a file under /experiments
(groups, datasets with shape/dtype/chunks, attributes) and return slices, reading through the
service, decided per request."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import numpy as np
import pytest
from extsupport import NOW, frames, make_h5

pytestmark = pytest.mark.slow

A = "NLS-2026-0001"
FILE = f"experiments/{A}/scan/frames.h5"


async def h5(jp_fetch, endpoint, prefix=("labvault", "h5grove"), **params):
    """(status, body, headers): JSON decoded when the answer is JSON."""
    r = await jp_fetch(*prefix, endpoint, "", params=params, raise_error=False)
    body = r.body
    if r.headers.get("Content-Type", "").startswith("application/json"):
        body = json.loads(body)
    return r.code, body, r.headers


async def test_meta_describes_groups_datasets_and_attributes(jp_fetch):
    status, root, _ = await h5(jp_fetch, "meta", file=FILE, path="/")
    assert status == 200
    assert root["kind"] == "group" and root["name"] == ""
    assert [c["name"] for c in root["children"]] == ["entry"]
    status, entry, _ = await h5(jp_fetch, "meta", file=FILE, path="/entry")
    kids = {c["name"]: c for c in entry["children"]}
    assert set(kids) == {"data", "instrument", "temperature", "sample", "link", "broken", "external"}
    assert {a["name"] for a in entry["attributes"]} == {"title", "energy_kev", "shape_hint"}
    data = kids["data"]
    assert data["kind"] == "dataset" and data["shape"] == [12, 64, 64] and data["chunks"] == [1, 64, 64]
    assert data["type"]["dtype"] == "<u2" and data["type"]["class"] == 0 and data["type"]["size"] == 2
    assert data["filters"] == [{"id": 1, "name": "deflate"}]
    assert kids["instrument"] == {"attributes": [], "kind": "group", "name": "instrument"}  # depth 1
    assert kids["link"]["kind"] == "dataset"  # a valid soft link is resolved
    assert kids["broken"] == {"kind": "soft_link", "name": "broken", "target_path": "/entry/nothing"}
    # external links are described, never followed
    assert kids["external"] == {"kind": "external_link", "name": "external", "target_file": "/etc/passwd",
                                "target_path": "/x"}
    assert kids["temperature"]["type"]["dtype"] == ">f8"
    assert kids["sample"]["type"]["vlen"] is True
    status, ds, _ = await h5(jp_fetch, "meta", file=FILE, path="/entry/data")
    assert ds["attributes"] == [{"name": "units", "shape": [], "type": ds["attributes"][0]["type"]}]


async def test_attr_returns_values(jp_fetch):
    status, attrs, _ = await h5(jp_fetch, "attr", file=FILE, path="/entry")
    assert status == 200
    assert attrs == {"title": "lysozyme soak 3", "energy_kev": 12.4, "shape_hint": [12, 64, 64]}
    status, attrs, _ = await h5(jp_fetch, "attr", file=FILE, path="/entry", attr_keys="title")
    assert attrs == {"title": "lysozyme soak 3"}
    status, body, _ = await h5(jp_fetch, "attr", file=FILE, path="/entry", attr_keys="nope")
    assert status == 404 and "nope" in body["reason"]


async def test_data_returns_slices_in_every_format(jp_fetch):
    want = frames()
    status, body, _ = await h5(jp_fetch, "data", file=FILE, path="/entry/data", selection="3")
    assert status == 200 and np.array_equal(np.array(body), want[3])
    status, body, _ = await h5(jp_fetch, "data", file=FILE, path="/entry/data", selection="2:6:2,10,5:9")
    assert np.array_equal(np.array(body), want[2:6:2, 10, 5:9])
    status, body, headers = await h5(jp_fetch, "data", file=FILE, path="/entry/data", selection="7",
                                     format="bin", dtype="safe")
    assert headers["Content-Type"] == "application/octet-stream"
    assert np.array_equal(np.frombuffer(body, dtype="<u2").reshape(64, 64), want[7])
    status, body, _ = await h5(jp_fetch, "data", file=FILE, path="/entry/data", selection="1,0:4", format="npy")
    assert np.array_equal(np.load(io.BytesIO(body)), want[1, 0:4])
    status, body, _ = await h5(jp_fetch, "data", file=FILE, path="/entry/data", selection="0,0:2", format="csv")
    assert body.decode().count("\n") == 2
    status, body, _ = await h5(jp_fetch, "data", file=FILE, path="/entry/data", selection="0,0", flatten="true")
    assert body == want[0, 0].tolist()
    status, body, _ = await h5(jp_fetch, "data", file=FILE, path="/entry/temperature")
    assert body == [1.5, None, None, 3.0]  # NaN and Inf are null, as h5grove encodes them
    status, body, _ = await h5(jp_fetch, "data", file=FILE, path="/entry/temperature", format="bin", dtype="safe")
    assert np.frombuffer(body, dtype="<f8")[0] == 1.5  # big-endian made little-endian
    status, body, _ = await h5(jp_fetch, "data", file=FILE, path="/entry/sample")
    assert body == "lysozyme"
    status, body, _ = await h5(jp_fetch, "stats", file=FILE, path="/entry/temperature")
    assert body["min"] == 1.5 and body["max"] == 3.0 and body["strict_positive_min"] == 1.5
    status, body, _ = await h5(jp_fetch, "paths", file=FILE, path="/entry/instrument")
    assert body == ["/entry/instrument", "/entry/instrument/detector"]


async def test_bad_requests_are_clear(jp_fetch):
    cases = [
        ({"path": "/entry/data"}, 400, "file"),
        ({"file": FILE, "path": "/entry/nothing"}, 404, "not a valid path"),
        ({"file": FILE, "path": "/entry/data", "selection": "1;2"}, 422, "selection"),
        ({"file": FILE, "path": "/entry/data", "selection": "99"}, 422, "out of range"),
        ({"file": FILE, "path": "/entry/data", "selection": "1,2,3,4"}, 422, "members"),
        ({"file": FILE, "path": "/entry", "selection": "1"}, 400, "not a dataset"),
        ({"file": FILE, "path": "/entry/data", "format": "tiff"}, 422, "format"),
        ({"file": FILE, "path": "/entry/data", "dtype": "weird"}, 422, "dtype"),
        ({"file": f"experiments/{A}/README.txt", "path": "/"}, 415, "not an HDF5 file"),
        ({"file": f"experiments/{A}/scan", "path": "/"}, 404, "no file"),
        ({"file": f"experiments/{A}/no-such.h5", "path": "/"}, 404, "no-such.h5"),
        ({"file": "experiments/NO-SUCH-EXPERIMENT/x.h5", "path": "/"}, 404, ""),
    ]
    for params, want_status, words in cases:
        status, body, _ = await h5(jp_fetch, "data", **params)
        assert status == want_status, (params, status, body)
        assert set(body) >= {"error", "rule", "reason", "message"}, body
        assert words.lower() in body["reason"].lower(), (params, body)


@pytest.mark.parametrize("extra_config", [{"LabvaultExtension": {"max_slice_bytes": 10_000}}])
async def test_a_slice_too_large_is_refused_before_reading(jp_fetch, extra_config):
    status, body, _ = await h5(jp_fetch, "data", file=FILE, path="/entry/data")
    assert status == 413 and body["rule"] == "labvault.size"
    status, body, _ = await h5(jp_fetch, "data", file=FILE, path="/entry/data", selection="0")
    assert status == 200  # one 64x64 frame: 8 KiB


async def test_h5web_urls_and_home_files(jp_fetch, jp_root_dir):
    status, meta, _ = await h5(jp_fetch, "meta", prefix=("h5web",), file=FILE, path="/entry/data")
    assert status == 200 and meta["shape"] == [12, 64, 64]
    make_h5(jp_root_dir / "local.h5")
    status, meta, _ = await h5(jp_fetch, "meta", file="local.h5", path="/entry/data")
    assert status == 200 and meta["chunks"] == [1, 64, 64]


@pytest.mark.parametrize("extra_config", [{"LabvaultExtension": {"h5web_routes": False}}])
async def test_h5web_urls_can_be_turned_off(jp_fetch, extra_config):
    status, _, _ = await h5(jp_fetch, "meta", prefix=("h5web",), file=FILE, path="/")
    assert status == 404


@pytest.mark.parametrize("user", ["frank"])
async def test_hdf5_access_ends_mid_session(jp_fetch, hub):
    status, _, _ = await h5(jp_fetch, "meta", file=FILE, path="/entry/data")
    assert status == 200
    hub.set_clock(NOW + timedelta(days=21))  # day 31 after the end
    status, body, _ = await h5(jp_fetch, "data", file=FILE, path="/entry/data", selection="0")
    assert status == 404 and body["rule"] == "facility.access_window", body
    assert body["error"] == "not found"


@pytest.mark.parametrize("user", ["carol"])
async def test_hdf5_of_an_experiment_one_cannot_read(jp_fetch):
    status, body, _ = await h5(jp_fetch, "meta", file=FILE, path="/")
    assert status == 404 and body["rule"] == "default.deny"  # not revealed: an unknown exID's answer
