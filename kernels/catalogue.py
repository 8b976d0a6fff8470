"""The environment catalogue: one TOML manifest per kernel environment, synced into the database.

A manifest (``kernels/environments/<name>.toml``) says what an environment is (a container
image, a kernelspec, or both), which licensed products it needs, whether it is a custom
proprietary environment and of which institution, and whether it is public. The policy decides
from those fields who may start it (``environment.licensed``,
``environment.proprietary_institution_only``); the spawner asks the datastore service, which
reads the database rows this module writes (``labvault environment sync``).

Parsing uses only the standard library (``tomllib``); every error names the file and the field.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: The catalogue shipped with labvault (the demo world's environments).
DEFAULT_CATALOGUE = Path(__file__).resolve().parent / "environments"

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")  # as labvault.datastore.operations
KERNEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # jupyter_client's rule, bounded

_FIELDS = {
    "name": "environment name: lower-case letters, digits, '.', '_', '-' (the file is <name>.toml)",
    "display_name": "the name users see in the spawn form",
    "description": "one or two sentences shown under the name",
    "image": "container image (Docker, Kubernetes)",
    "kernelspec": "a kernelspec name, or a table {name, display_name, language, argv, env}",
    "licences": "licensed products the environment needs (list of product names)",
    "proprietary": "a custom proprietary environment: its institution only, never public",
    "institution": "owning institution (required when proprietary)",
    "public": "listed publicly (never for proprietary environments)",
}
_KERNEL_FIELDS = {"name", "display_name", "language", "argv", "env", "interrupt_mode", "metadata"}


class CatalogueError(ValueError):
    """A manifest is wrong. The message names the file and the field."""

    def __init__(self, path: Path | str, field_: str | None, message: str):
        where = f"{path}" + (f", field {field_!r}" if field_ else "")
        super().__init__(f"{where}: {message}")
        self.path, self.field, self.message = str(path), field_, message


@dataclass(frozen=True)
class KernelSpec:
    """A kernelspec the environment offers. With ``argv`` it can be installed
    (:func:`install_kernelspecs`); without, it names one the server already has (``python3``)."""

    name: str
    display_name: str = ""
    language: str = ""
    argv: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    interrupt_mode: str = ""
    metadata: tuple[tuple[str, Any], ...] = ()

    def kernel_json(self) -> dict:
        out: dict[str, Any] = {"argv": list(self.argv), "display_name": self.display_name or self.name,
                               "language": self.language}
        if self.env:
            out["env"] = dict(self.env)
        if self.interrupt_mode:
            out["interrupt_mode"] = self.interrupt_mode
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        return out


@dataclass(frozen=True)
class EnvironmentManifest:
    """One environment of the catalogue, validated."""

    name: str
    display_name: str
    image: str | None = None
    kernelspec: KernelSpec | None = None
    licences: tuple[str, ...] = ()
    proprietary: bool = False
    institution: str | None = None
    public: bool = False
    description: str = ""
    source: str = ""

    def operation_fields(self) -> dict:
        """Keyword arguments of :func:`labvault.datastore.operations.add_environment`."""
        return {"display_name": self.display_name, "image": self.image,
                "kernelspec": self.kernelspec.name if self.kernelspec else None,
                "licences": list(self.licences), "proprietary": self.proprietary,
                "institution": self.institution, "public": self.public}


# ----------------------------------------------------------------------------------------
# parsing and validation
# ----------------------------------------------------------------------------------------
def _str(path: Path, data: dict, key: str, *, required: bool = False, empty_ok: bool = True) -> str | None:
    if key not in data:
        if required:
            raise CatalogueError(path, key, f"missing ({_FIELDS.get(key, key)})")
        return None
    value = data[key]
    if not isinstance(value, str):
        raise CatalogueError(path, key, f"must be a string, not {type(value).__name__}")
    value = value.strip()
    if not value and not empty_ok:
        raise CatalogueError(path, key, "must not be empty")
    return value


def _bool(path: Path, data: dict, key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise CatalogueError(path, key, f"must be true or false, not {value!r}")
    return value


def _unknown(path: Path, keys: Iterable[str], known: Iterable[str], prefix: str = "") -> None:
    known = list(known)
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
            raise CatalogueError(path, prefix + key, "unknown field" + hint)


def _kernelspec(path: Path, value: Any) -> KernelSpec:
    if isinstance(value, str):
        name = value.strip()
        if not KERNEL_NAME_RE.match(name):
            raise CatalogueError(path, "kernelspec", f"bad kernelspec name {value!r}")
        return KernelSpec(name=name)
    if not isinstance(value, dict):
        raise CatalogueError(path, "kernelspec", "must be a kernelspec name or a table")
    _unknown(path, value, _KERNEL_FIELDS, "kernelspec.")
    name = _str(path, value, "name", required=True, empty_ok=False)
    if not KERNEL_NAME_RE.match(name):
        raise CatalogueError(path, "kernelspec.name", f"bad kernelspec name {name!r}: letters, digits, '.', '_', '-'")
    argv = value.get("argv", [])
    if not isinstance(argv, list) or not all(isinstance(a, str) and a for a in argv):
        raise CatalogueError(path, "kernelspec.argv", "must be a list of non-empty strings")
    if argv and not any("{connection_file}" in a for a in argv):
        raise CatalogueError(path, "kernelspec.argv", "must pass '{connection_file}' to the kernel")
    language = _str(path, value, "language") or ""
    if argv and not language:
        raise CatalogueError(path, "kernelspec.language", "missing (e.g. \"python\")")
    env = value.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise CatalogueError(path, "kernelspec.env", "must be a table of strings")
    interrupt = _str(path, value, "interrupt_mode") or ""
    if interrupt not in ("", "signal", "message"):
        raise CatalogueError(path, "kernelspec.interrupt_mode", "must be \"signal\" or \"message\"")
    metadata = value.get("metadata", {})
    if not isinstance(metadata, dict):
        raise CatalogueError(path, "kernelspec.metadata", "must be a table")
    return KernelSpec(name=name, display_name=_str(path, value, "display_name") or "", language=language,
                      argv=tuple(argv), env=tuple(sorted(env.items())), interrupt_mode=interrupt,
                      metadata=tuple(sorted(metadata.items())))


def parse_manifest(path: Path | str, data: dict) -> EnvironmentManifest:
    """Validate one manifest's parsed TOML (``data``); ``path`` is named in errors."""
    path = Path(path)
    _unknown(path, data, _FIELDS)
    name = _str(path, data, "name", required=True, empty_ok=False)
    if not NAME_RE.match(name):
        raise CatalogueError(path, "name", f"bad environment name {name!r}: {_FIELDS['name']}")
    if path.suffix == ".toml" and path.stem != name:
        raise CatalogueError(path, "name", f"{name!r} must match the file name ({path.stem}.toml)")
    image = _str(path, data, "image", empty_ok=False)
    kernelspec = _kernelspec(path, data["kernelspec"]) if "kernelspec" in data else None
    if not image and kernelspec is None:
        raise CatalogueError(path, "image", "an environment needs an image, a kernelspec, or both")
    licences = data.get("licences", [])
    if not isinstance(licences, list) or not all(isinstance(x, str) and x.strip() for x in licences):
        raise CatalogueError(path, "licences", "must be a list of product names (non-empty strings)")
    if len({x.strip() for x in licences}) != len(licences):
        raise CatalogueError(path, "licences", "lists a product twice")
    proprietary = _bool(path, data, "proprietary")
    public = _bool(path, data, "public")
    institution = _str(path, data, "institution") or None
    if proprietary and public:
        raise CatalogueError(path, "public", "a proprietary environment can never be public "
                             "(environment.proprietary_institution_only)")
    if proprietary and not institution:
        raise CatalogueError(path, "institution", "a proprietary environment needs its owning institution")
    if institution and not proprietary:
        raise CatalogueError(path, "institution", "only proprietary environments have an owning institution")
    return EnvironmentManifest(
        name=name, display_name=_str(path, data, "display_name") or name, image=image,
        kernelspec=kernelspec, licences=tuple(sorted(x.strip() for x in licences)),
        proprietary=proprietary, institution=institution, public=public,
        description=_str(path, data, "description") or "", source=str(path),
    )


def load_manifest(path: Path | str) -> EnvironmentManifest:
    """Read and validate one manifest file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise CatalogueError(path, None, f"not valid TOML: {e}") from None
    except OSError as e:
        raise CatalogueError(path, None, f"cannot read: {e.strerror}") from None
    return parse_manifest(path, data)


def load_catalogue(directory: Path | str | None = None) -> list[EnvironmentManifest]:
    """Every ``*.toml`` manifest in ``directory`` (default: the shipped catalogue), by name."""
    directory = Path(directory) if directory else DEFAULT_CATALOGUE
    if not directory.is_dir():
        raise CatalogueError(directory, None, "no such catalogue directory")
    manifests: dict[str, EnvironmentManifest] = {}
    for path in sorted(directory.glob("*.toml")):
        m = load_manifest(path)
        if m.name in manifests:
            raise CatalogueError(path, "name", f"{m.name!r} is also defined in {manifests[m.name].source}")
        manifests[m.name] = m
    kernels: dict[str, str] = {}
    for m in manifests.values():
        ks = m.kernelspec
        if ks is not None and ks.argv:
            if ks.name in kernels:
                raise CatalogueError(m.source, "kernelspec.name",
                                     f"kernelspec {ks.name!r} is also installed by {kernels[ks.name]}")
            kernels[ks.name] = m.source
    return sorted(manifests.values(), key=lambda m: m.name)


# ----------------------------------------------------------------------------------------
# into the database, onto disk
# ----------------------------------------------------------------------------------------
@dataclass
class SyncReport:
    """What :func:`sync_catalogue` did (or, with ``dry_run``, would do)."""

    added: list[str] = field(default_factory=list)
    updated: dict[str, list[str]] = field(default_factory=dict)  # name -> changed fields
    unchanged: list[str] = field(default_factory=list)
    not_in_catalogue: list[str] = field(default_factory=list)  # in the database only: left alone


def _database_fields(session, env) -> dict:
    from labvault.datastore.models import Institution

    inst = session.get(Institution, env.institution_id) if env.institution_id else None
    return {"display_name": env.display_name, "image": env.image, "kernelspec": env.kernelspec,
            "licences": sorted(env.licences or []), "proprietary": env.proprietary,
            "institution": inst.name if inst else None, "public": env.public}


def sync_catalogue(factory, actor, manifests: Iterable[EnvironmentManifest], *, dry_run: bool = False,
                   now: datetime | None = None) -> SyncReport:
    """Make the ``environments`` table hold every manifest: add new ones, update changed ones
    (each change audited as ``environment.add`` / ``environment.update``). Environments that
    are in the database but not in the catalogue are reported and left alone (they may have
    been added with ``labvault environment add``)."""
    from sqlalchemy import select

    from labvault.datastore import operations as ops
    from labvault.datastore.models import Environment, Institution

    manifests = list(manifests)
    report = SyncReport()
    with factory() as s:
        existing = {e.name: _database_fields(s, e) for e in s.scalars(select(Environment))}
        institutions = set(s.scalars(select(Institution.name)))
    for m in manifests:  # check every institution before changing anything
        if m.institution and m.institution not in institutions:
            raise CatalogueError(m.source, "institution", f"no institution {m.institution!r} in the database "
                                 "(add it with `labvault institution add` first)")
    for m in manifests:
        wanted = m.operation_fields()
        have = existing.get(m.name)
        if have is None:
            if not dry_run:
                ops.add_environment(factory, actor, m.name, now=now, **wanted)
            report.added.append(m.name)
            continue
        wanted_cmp = {**wanted, "licences": sorted(wanted["licences"])}
        changed = [k for k in have if have[k] != wanted_cmp[k]]
        if not changed:
            report.unchanged.append(m.name)
        elif dry_run:
            report.updated[m.name] = changed
        else:
            report.updated[m.name] = ops.update_environment(factory, actor, m.name, now=now, **wanted) or changed
    names = {m.name for m in manifests}
    report.not_in_catalogue = sorted(n for n in existing if n not in names)
    return report


def install_kernelspecs(manifests: Iterable[EnvironmentManifest], data_dir: Path | str) -> list[Path]:
    """Write ``<data_dir>/kernels/<name>/kernel.json`` for every manifest whose kernelspec has an
    ``argv``. ``data_dir`` is a Jupyter data directory: the local spawner puts it on the server's
    ``JUPYTER_PATH`` (``LabvaultLocalSpawner.kernel_data_dirs``)."""
    written = []
    for m in manifests:
        ks = m.kernelspec
        if ks is None or not ks.argv:
            continue
        target = Path(data_dir) / "kernels" / ks.name
        target.mkdir(parents=True, exist_ok=True)
        spec = ks.kernel_json()
        spec.setdefault("metadata", {})["labvault_environment"] = m.name
        tmp = target / "kernel.json.tmp"
        tmp.write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")
        tmp.replace(target / "kernel.json")
        written.append(target / "kernel.json")
    return written


__all__ = ["CatalogueError", "EnvironmentManifest", "KernelSpec", "SyncReport", "DEFAULT_CATALOGUE",
           "install_kernelspecs", "load_catalogue", "load_manifest", "parse_manifest", "sync_catalogue"]
