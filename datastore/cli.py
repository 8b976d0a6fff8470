"""`labvault`: the admin command line, a traitlets Application with subcommands (the Jupyter way).

    labvault init                      create the data directory and the database
    labvault db upgrade|current        schema migrations (Alembic)
    labvault institution add|list      institutions, their verified domains / IdPs, vendor flag
    labvault user add|list|state       accounts
    labvault user export|correct|request-deletion|close NAME   data-subject rights
    labvault department add|member     departments (also virtual) and memberships
    labvault project add|link          projects and their experiments
    labvault experiment add|list       experiments (``list --as USER``: what USER may see)
    labvault role grant|revoke|list    roles on experiments (decided by the policy)
    labvault licence add               licences an institution holds
    labvault environment add|list|sync kernel environments; sync: from the catalogue (kernels/)
    labvault audit verify|list         the hash-chained audit log
    labvault ingest EXID PATH...       store files encrypted on every storage location (resumable)
    labvault file list|delete          stored files; delete = crypto-shred (PI's decision)
    labvault scrub [EXID]              verify every chunk on every replica and repair
    labvault keys rotate|list          master keys: re-wrap every data key under a new one
    labvault lifecycle run             retention expiry, notices, account states (--dry-run)
    labvault demo                      seed the demo world (idempotent) and print it

Bad input prints one line on stderr and exits 2 (refusals by the policy exit 3); every change
runs in one transaction, so nothing is half-written.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from traitlets import Bool, Int, List, TraitError, Unicode, default
from traitlets.config import Application
from traitlets.config.loader import KVArgParseConfigLoader, _KVArgParser

from labvault import __version__

from . import operations as ops
from .db import make_engine, session_factory
from .migrate import current_revision, head_revision, upgrade
from .store.errors import StoreError

EXIT_USAGE = 2
EXIT_DENIED = 3


class CommandError(Exception):
    """A problem the user can fix; printed as one line."""


def parse_time(value: str, what: str) -> datetime:
    """ISO date or date-time; naive values are taken as UTC."""
    try:
        t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CommandError(f"bad {what} {value!r}: expected an ISO date like 2026-03-01 or 2026-03-01T12:00") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


class _OneLineParser(_KVArgParser):
    """argparse prints the whole usage on an error; we raise, and print one line."""

    def error(self, message):
        raise CommandError(f"{message} (see --help)")


class _OneLineLoader(KVArgParseConfigLoader):
    parser_class = _OneLineParser


def _table(rows: list[tuple], header: tuple) -> str:
    rows = [tuple("" if c is None else str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


class LabvaultCommand(Application):
    """Base of every command: where the data lives, and one-line errors."""

    version = __version__
    raise_config_file_errors = True  # a broken config file stops the command (one line)
    nargs: tuple[int, int] = (0, 0)  # (min, max) positional arguments; max -1 = any
    usage = ""

    data_dir = Unicode(
        help="""Data directory of the embedded default (database, keys, storage).

        Defaults to $LABVAULT_DATA_DIR or ./var.""",
    ).tag(config=True)

    @default("data_dir")
    def _default_data_dir(self):
        return os.environ.get("LABVAULT_DATA_DIR", "var")

    db_url = Unicode(
        help="""SQLAlchemy URL of the metadata database.

        Defaults to $LABVAULT_DB_URL, else SQLite in the data directory. PostgreSQL:
        postgresql://user@host/dbname (psycopg 3).""",
    ).tag(config=True)

    @default("db_url")
    def _default_db_url(self):
        env = os.environ.get("LABVAULT_DB_URL")
        if env:
            return env
        return f"sqlite:///{Path(self.data_dir).resolve() / 'labvault.sqlite'}"

    operator = Unicode(help="Name recorded as the actor of operator changes in the audit log.").tag(config=True)

    @default("operator")
    def _default_operator(self):
        return os.environ.get("SUDO_USER") or os.environ.get("USER") or "cli"

    aliases = {"data-dir": "LabvaultCommand.data_dir", "db-url": "LabvaultCommand.db_url"}
    flags: dict = {}

    def _create_loader(self, argv, aliases, flags, classes):
        return _OneLineLoader(argv, aliases, flags, classes=classes, log=self.log, subcommands=self.subcommands)

    def initialize_subcommand(self, subc, argv=None):
        # A fresh instance each time (not the traitlets singleton), so nothing carries over
        # between two commands run in one process.
        cls = self.subcommands[subc][0]
        if isinstance(cls, str):  # imported lazily (the service pulls in tornado and jupyterhub)
            from traitlets.utils.importstring import import_item

            cls = import_item(cls)
        self.subapp = cls(parent=self)
        self.subapp.initialize(argv)

    def initialize(self, argv=None):  # no catch_config_error: launch_instance prints one line
        self.parse_command_line(argv)
        if self.subapp is None:  # the command that runs: its --data-dir is known now
            self._load_deployment_config()
        if self.subapp is None and self.subcommands and self.extra_args:
            raise CommandError(
                f"unknown command {self.extra_args[0]!r}: choose one of {', '.join(sorted(self.subcommands))}"
            )
        if self.subapp is None:
            lo, hi = self.nargs
            n = len(self.extra_args)
            if n < lo or (hi >= 0 and n > hi):
                raise CommandError(f"{self.name}: expected {self.usage or 'no arguments'}, got {n} argument(s)")

    def _load_deployment_config(self) -> None:
        """Read labvault_config.py from /etc/labvault and the data directory (the command line
        wins), and configure the policy engine from it (e.g. c.Policy.facility_access_days)."""
        from copy import deepcopy

        from labvault.policies import Policy, set_default_policy

        command_line = deepcopy(self.config)
        for path in ("/etc/labvault", str(Path(self.data_dir).resolve())):
            if Path(path, "labvault_config.py").is_file():
                try:
                    self.load_config_file("labvault_config.py", path=path)
                except Exception as e:  # a config file is Python: any error is the admin's to fix
                    raise CommandError(f"bad configuration in {path}/labvault_config.py: {e}") from None
        self.update_config(command_line)
        try:
            set_default_policy(Policy(config=self.config))
        except TraitError as e:
            raise CommandError(f"bad configuration: {e}") from None

    @classmethod
    def launch_instance(cls, argv=None, **kwargs):
        try:
            app = cls(**kwargs)
            app.initialize(argv)
            app.start()
        except BrokenPipeError:  # `labvault ... | head`
            sys.stderr.close()
            sys.exit(0)
        except ops.Denied as e:
            print(f"labvault: {e}", file=sys.stderr)
            sys.exit(EXIT_DENIED)
        except (CommandError, ops.OperationError, StoreError) as e:
            print(f"labvault: {e}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except OperationalError as e:
            print(f"labvault: database error: {str(e.orig).splitlines()[0]} (did you run `labvault init`?)", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except SQLAlchemyError as e:
            print(f"labvault: database error: {str(getattr(e, 'orig', e)).splitlines()[0]}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except Exception as e:  # traitlets' ArgumentError/TraitError and friends
            name = type(e).__name__
            if name in ("ArgumentError", "TraitError", "UnrecognizedFlag", "ConfigError"):
                print(f"labvault: {str(e).splitlines()[0]}", file=sys.stderr)
                sys.exit(EXIT_USAGE)
            raise

    def start(self):
        if self.subapp is not None:
            return self.subapp.start()
        if self.subcommands:
            print(self.description.strip() or self.__doc__)
            print("\nsubcommands: " + ", ".join(sorted(self.subcommands)))
            raise CommandError(f"{self.name}: choose a subcommand ({', '.join(sorted(self.subcommands))})")
        return self.run()

    def run(self):  # pragma: no cover - overridden
        raise NotImplementedError

    # shared helpers ------------------------------------------------------------------
    _factory = None

    @property
    def factory(self):
        if self._factory is None:
            self._factory = session_factory(make_engine(self.db_url))
        return self._factory

    @property
    def actor(self) -> ops.Actor:
        return ops.Actor(operator=self.operator)

    def chunk_store(self):
        """The chunk store, configured from this command's config (c.ChunkStore...)."""
        from .store import ChunkStore

        return ChunkStore(parent=self, sessions=self.factory, data_dir=str(Path(self.data_dir).resolve()))

    def actor_as(self, user: str) -> ops.Actor:
        if not user:
            return self.actor
        with self.factory() as s:
            return ops.Actor(user_id=ops.get_user(s, user).id)


def _sub(cls, help_):
    return (cls, help_)


# ---------------------------------------------------------------------------------------
class InitCommand(LabvaultCommand):
    name = "labvault-init"
    description = ("Create the data directory (mode 0700), the master key (0600) and the storage "
                   "locations, and bring the database to the newest schema.")

    def run(self):
        d = Path(self.data_dir)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        engine = make_engine(self.db_url)
        upgrade(engine)
        if engine.url.get_backend_name() == "sqlite" and engine.url.database:
            os.chmod(engine.url.database, 0o600)  # the data directory is 0700 too
        store = self.chunk_store()
        made = store.prepare_locations()
        print(f"labvault: data directory {d.resolve()}")
        print(f"labvault: database at revision {current_revision(engine)} ({_safe_url(self.db_url)})")
        print(f"labvault: master key {store.key_provider.current_key_id()}")
        for path in made:
            print(f"labvault: storage location {path}")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class DbUpgrade(LabvaultCommand):
    name = "labvault-db-upgrade"
    description = "Upgrade the database schema to the newest revision (empty or existing database)."

    def run(self):
        engine = make_engine(self.db_url)
        before = current_revision(engine)
        upgrade(engine)
        print(f"labvault: database upgraded from {before or 'empty'} to {current_revision(engine)}")


class DbCurrent(LabvaultCommand):
    name = "labvault-db-current"
    description = "Print the database's schema revision and the newest one."

    def run(self):
        rev = current_revision(make_engine(self.db_url))
        print(f"current: {rev or 'empty'}  head: {head_revision()}")


class DbCommand(LabvaultCommand):
    name = "labvault-db"
    description = "Database schema commands."
    subcommands = {
        "upgrade": _sub(DbUpgrade, DbUpgrade.description),
        "current": _sub(DbCurrent, DbCurrent.description),
    }


# ---------------------------------------------------------------------------------------
class InstitutionAdd(LabvaultCommand):
    name = "labvault-institution-add"
    description = "Add an institution: labvault institution add NAME --domain psi.ch [--idp ID] [--vendor]"
    nargs, usage = (1, 1), "NAME"
    domains = List(Unicode(), help="Verified e-mail domain (repeat for more).").tag(config=True)
    idps = List(Unicode(), help="Identity-provider identifier, e.g. a schacHomeOrganization (repeat).").tag(config=True)
    vendor = Bool(False, help="Vendor staff: never access proprietary data.").tag(config=True)
    facility = Bool(False, help="A facility (its members register experiments).").tag(config=True)
    unverified = Bool(False, help="Not (yet) verified: its members are not admitted.").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "domain": "InstitutionAdd.domains", "idp": "InstitutionAdd.idps"}
    flags = {
        "vendor": ({"InstitutionAdd": {"vendor": True}}, vendor.help),
        "facility": ({"InstitutionAdd": {"facility": True}}, facility.help),
        "unverified": ({"InstitutionAdd": {"unverified": True}}, unverified.help),
    }

    def run(self):
        ops.add_institution(self.factory, self.actor, self.extra_args[0], domains=self.domains,
                            idps=self.idps, vendor=self.vendor, facility=self.facility,
                            verified=not self.unverified)
        print(f"labvault: institution {self.extra_args[0]!r} added")


class InstitutionList(LabvaultCommand):
    name = "labvault-institution-list"
    description = "List institutions."

    def run(self):
        from .models import Institution

        with self.factory() as s:
            rows = []
            for i in s.scalars(select(Institution).order_by(Institution.name)):
                ids = ", ".join(f"{x.kind}={x.value}" for x in i.identifiers)
                lic = ", ".join(f"{li.product}" + (f" until {li.valid_until:%Y-%m-%d}" if li.valid_until else "") for li in i.licences)
                rows.append((i.name, "yes" if i.verified else "no", "vendor" if i.is_vendor else ("facility" if i.is_facility else ""), ids, lic))
        print(_table(rows, ("institution", "verified", "kind", "identifiers", "licences")))


class InstitutionCommand(LabvaultCommand):
    name = "labvault-institution"
    description = "Institutions."
    subcommands = {"add": _sub(InstitutionAdd, InstitutionAdd.description),
                   "list": _sub(InstitutionList, InstitutionList.description)}


# ---------------------------------------------------------------------------------------
class UserAdd(LabvaultCommand):
    name = "labvault-user-add"
    description = "Add a user: labvault user add NAME --institution I [--department D] [--admin]"
    nargs, usage = (1, 1), "NAME"
    institution = Unicode("", help="The user's institution.").tag(config=True)
    display_name = Unicode("", help="First and last name (what other users see).").tag(config=True)
    email = Unicode("", help="Personal e-mail (private).").tag(config=True)
    institutional_email = Unicode("", help="Institutional e-mail address.").tag(config=True)
    verified = Bool(False, help="The institutional e-mail is verified (needed to be a PI).").tag(config=True)
    department = Unicode("", help="Home department (read + modify).").tag(config=True)
    state = Unicode("active", help="tentative, active, deactivated or closed.").tag(config=True)
    admin = Bool(False, help="Administrator (manages access rights; reads no data by that).").tag(config=True)
    orcid = Unicode("", help="ORCID iD.").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "institution": "UserAdd.institution",
               "display-name": "UserAdd.display_name", "email": "UserAdd.email",
               "institutional-email": "UserAdd.institutional_email", "department": "UserAdd.department",
               "state": "UserAdd.state", "orcid": "UserAdd.orcid"}
    flags = {"admin": ({"UserAdd": {"admin": True}}, admin.help),
             "verified": ({"UserAdd": {"verified": True}}, verified.help)}

    def run(self):
        ops.add_user(self.factory, self.actor, self.extra_args[0], institution=self.institution or None,
                     display_name=self.display_name, email=self.email or None,
                     department=self.department or None, admin=self.admin, state=self.state,
                     institutional_email=self.institutional_email or None,
                     verified_institutional_email=self.verified, orcid=self.orcid or None)
        print(f"labvault: user {self.extra_args[0]!r} added")


class UserList(LabvaultCommand):
    name = "labvault-user-list"
    description = "List users (name, institution, state; e-mail addresses are not printed)."

    def run(self):
        from .models import Institution, User

        with self.factory() as s:
            rows = s.execute(select(User.name, User.display_name, Institution.name, User.state, User.is_admin)
                             .outerjoin(Institution, Institution.id == User.institution_id).order_by(User.name)).all()
        print(_table([(n, d, i, st.value, "admin" if a else "") for n, d, i, st, a in rows],
                     ("user", "name", "institution", "state", "")))


class UserState(LabvaultCommand):
    name = "labvault-user-state"
    description = "Set a user's state: labvault user state NAME active|deactivated|closed|tentative"
    nargs, usage = (2, 2), "NAME STATE"

    def run(self):
        ops.set_user_state(self.factory, self.actor, self.extra_args[0], self.extra_args[1])
        print(f"labvault: {self.extra_args[0]} is now {self.extra_args[1]}")


class UserExport(LabvaultCommand):
    name = "labvault-user-export"
    description = "Everything labvault holds about a user, as JSON (right of access): labvault user export NAME"
    nargs, usage = (1, 1), "NAME"

    def run(self):
        import json

        from .rights import export

        print(json.dumps(export(self.factory, self.actor, self.extra_args[0]), indent=2, ensure_ascii=False))


class UserCorrect(LabvaultCommand):
    name = "labvault-user-correct"
    description = ("Correct a user's personal data: labvault user correct NAME [--display-name N] [--email E] "
                   "[--orcid O] [--phone P] [--email-visible|--email-hidden] [--under-18]")
    nargs, usage = (1, 1), "NAME"
    display_name = Unicode(None, allow_none=True, help="First and last name.").tag(config=True)
    email = Unicode(None, allow_none=True, help="Personal e-mail (takes effect at once).").tag(config=True)
    orcid = Unicode(None, allow_none=True, help="ORCID iD (empty: remove it).").tag(config=True)
    phone = Unicode(None, allow_none=True, help="Phone number, international form (empty: remove it).").tag(config=True)
    email_visible = Bool(None, allow_none=True, help="Show the e-mail to other users.").tag(config=True)
    under_18 = Bool(False, help="Flag the account as someone's under 18: the lifecycle job deactivates it "
                    "and removes its personal data.").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "display-name": "UserCorrect.display_name", "email": "UserCorrect.email",
               "orcid": "UserCorrect.orcid", "phone": "UserCorrect.phone"}
    flags = {"email-visible": ({"UserCorrect": {"email_visible": True}}, "Show the e-mail to other users."),
             "email-hidden": ({"UserCorrect": {"email_visible": False}}, "Hide the e-mail from other users."),
             "under-18": ({"UserCorrect": {"under_18": True}}, under_18.help)}

    def run(self):
        from .rights import correct_account

        changes = {k: getattr(self, k) for k in ("display_name", "email", "orcid", "phone", "email_visible")
                   if getattr(self, k) is not None}
        if self.under_18:
            changes["under_18"] = True
        correct_account(self.factory, self.actor, self.extra_args[0], changes)
        print(f"labvault: {self.extra_args[0]} corrected: {', '.join(sorted(changes))}")


class UserRequestDeletion(LabvaultCommand):
    name = "labvault-user-request-deletion"
    description = ("Delete a user's personal data now and close the account, at their request "
                   "(role history, audit and experiment metadata are exempt): labvault user request-deletion NAME --yes")
    nargs, usage = (1, 1), "NAME"
    yes = Bool(False, help="Confirm: this cannot be undone.").tag(config=True)
    flags = {"yes": ({"UserRequestDeletion": {"yes": True}}, yes.help)}

    def run(self):
        from .rights import request_deletion

        if not self.yes:
            raise CommandError("deleting personal data cannot be undone: add --yes")
        result = request_deletion(self.factory, self.actor, self.extra_args[0], store=self.chunk_store())
        print(f"labvault: {self.extra_args[0]}: account closed; removed: {', '.join(result['erased']) or 'nothing'}; "
              f"{result['personal_files_deleted']} personal file(s) crypto-shredded")
        for item in result["kept"]:
            print(f"labvault: kept: {item['what']} ({item['rule']})")


class UserClose(LabvaultCommand):
    name = "labvault-user-close"
    description = "Close an account (roles end at once; personal data is anonymised a year later): labvault user close NAME"
    nargs, usage = (1, 1), "NAME"

    def run(self):
        from .rights import close_account

        close_account(self.factory, self.actor, self.extra_args[0])
        print(f"labvault: {self.extra_args[0]}'s account is closed; its active roles ended")


class UserCommand(LabvaultCommand):
    name = "labvault-user"
    description = "User accounts."
    subcommands = {"add": _sub(UserAdd, UserAdd.description), "list": _sub(UserList, UserList.description),
                   "state": _sub(UserState, UserState.description),
                   "export": _sub(UserExport, UserExport.description),
                   "correct": _sub(UserCorrect, UserCorrect.description),
                   "request-deletion": _sub(UserRequestDeletion, UserRequestDeletion.description),
                   "close": _sub(UserClose, UserClose.description)}


# ---------------------------------------------------------------------------------------
class DepartmentAdd(LabvaultCommand):
    name = "labvault-department-add"
    description = "Add a department: labvault department add NAME --institution I [--virtual]"
    nargs, usage = (1, 1), "NAME"
    institution = Unicode("", help="Institution the department belongs to.").tag(config=True)
    virtual = Bool(False, help="A virtual department (shared resources, confidential work, customers).").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "institution": "DepartmentAdd.institution"}
    flags = {"virtual": ({"DepartmentAdd": {"virtual": True}}, virtual.help)}

    def run(self):
        if not self.institution:
            raise CommandError("--institution is required")
        ops.add_department(self.factory, self.actor, self.extra_args[0], self.institution, virtual=self.virtual)
        print(f"labvault: department {self.extra_args[0]!r} added")


class DepartmentMember(LabvaultCommand):
    name = "labvault-department-member"
    description = "Give USER access to a department's data: labvault department member USER --institution I --department D [--modify]"
    nargs, usage = (1, 1), "USER"
    institution = Unicode("", help="Institution of the department.").tag(config=True)
    department = Unicode("", help="Department name.").tag(config=True)
    modify = Bool(False, help="Read and modify (default: read only).").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "institution": "DepartmentMember.institution",
               "department": "DepartmentMember.department"}
    flags = {"modify": ({"DepartmentMember": {"modify": True}}, modify.help)}

    def run(self):
        if not (self.institution and self.department):
            raise CommandError("--institution and --department are required")
        ops.add_membership(self.factory, self.actor, self.extra_args[0], self.institution,
                           self.department, modify=self.modify)
        print(f"labvault: {self.extra_args[0]} may {'read and modify' if self.modify else 'read'} data of {self.department}")


class DepartmentCommand(LabvaultCommand):
    name = "labvault-department"
    description = "Departments and teams."
    subcommands = {"add": _sub(DepartmentAdd, DepartmentAdd.description),
                   "member": _sub(DepartmentMember, DepartmentMember.description)}


# ---------------------------------------------------------------------------------------
class ProjectAdd(LabvaultCommand):
    name = "labvault-project-add"
    description = "Add a project: labvault project add NAME --institution I [--pi USER]"
    nargs, usage = (1, 1), "NAME"
    institution = Unicode("", help="Owning institution.").tag(config=True)
    pi = Unicode("", help="The project's PI.").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "institution": "ProjectAdd.institution", "pi": "ProjectAdd.pi"}

    def run(self):
        if not self.institution:
            raise CommandError("--institution is required")
        ops.add_project(self.factory, self.actor, self.extra_args[0], self.institution, pi=self.pi or None)
        print(f"labvault: project {self.extra_args[0]!r} added")


class ProjectLink(LabvaultCommand):
    name = "labvault-project-link"
    description = "Link an experiment to a project: labvault project link EXID PROJECT"
    nargs, usage = (2, 2), "EXID PROJECT"

    def run(self):
        ops.link_project(self.factory, self.actor, self.extra_args[0], self.extra_args[1])
        print(f"labvault: {self.extra_args[0]} linked to {self.extra_args[1]}")


class ProjectCommand(LabvaultCommand):
    name = "labvault-project"
    description = "Projects."
    subcommands = {"add": _sub(ProjectAdd, ProjectAdd.description),
                   "link": _sub(ProjectLink, ProjectLink.description)}


# ---------------------------------------------------------------------------------------
class ExperimentAdd(LabvaultCommand):
    name = "labvault-experiment-add"
    description = "Register an experiment: labvault experiment add EXID --pi USER [--open] [--end DATE]"
    nargs, usage = (1, 1), "EXID"
    pi = Unicode("", help="The PI (owner); needs a verified institutional e-mail.").tag(config=True)
    title = Unicode("", help="Title.").tag(config=True)
    facility = Unicode("", help="Facility / beamline.").tag(config=True)
    start_at = Unicode("", help="Start (ISO date or time).").tag(config=True)
    end_at = Unicode("", help="End (ISO date or time); facility staff keep access 30 days after.").tag(config=True)
    open = Bool(False, help="Not proprietary (default: proprietary).").tag(config=True)
    department = Unicode("", help="Owning department of the PI's institution (default: the PI's).").tag(config=True)
    projects = List(Unicode(), help="Project to link (repeat).").tag(config=True)
    by = Unicode("", help="Register as this labvault user (default: operator).").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "pi": "ExperimentAdd.pi", "title": "ExperimentAdd.title",
               "facility": "ExperimentAdd.facility", "start": "ExperimentAdd.start_at", "end": "ExperimentAdd.end_at",
               "department": "ExperimentAdd.department", "project": "ExperimentAdd.projects", "by": "ExperimentAdd.by"}
    flags = {"open": ({"ExperimentAdd": {"open": True}}, open.help)}

    def run(self):
        if not self.pi:
            raise CommandError("--pi is required")
        ops.add_experiment(
            self.factory, self.actor_as(self.by), self.extra_args[0], pi=self.pi, title=self.title,
            facility=self.facility, start_at=parse_time(self.start_at, "--start") if self.start_at else None,
            end_at=parse_time(self.end_at, "--end") if self.end_at else None, proprietary=not self.open,
            department=self.department or None, projects=self.projects,
        )
        print(f"labvault: experiment {self.extra_args[0]} registered")


class ExperimentList(LabvaultCommand):
    name = "labvault-experiment-list"
    description = "List experiments; with --as USER only those USER may access now (decided in SQL)."
    as_user = Unicode("", help="Show what this user may see.").tag(config=True)
    at = Unicode("", help="Evaluate at this time instead of now (ISO).").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "as": "ExperimentList.as_user", "at": "ExperimentList.at"}

    def run(self):
        from .models import Experiment, User

        now = parse_time(self.at, "--at") if self.at else datetime.now(timezone.utc)
        with self.factory() as s:
            if self.as_user:
                exps = ops.list_visible_experiments(s, self.as_user, now)
            else:
                exps = list(s.scalars(select(Experiment).order_by(Experiment.exid)))
            names = dict(s.execute(select(User.id, User.name)).all())
            rows = [(e.exid, names.get(e.pi_id), "proprietary" if e.proprietary else ("public" if e.public else "open"),
                     e.facility, f"{e.end_at:%Y-%m-%d}" if e.end_at else "", e.title) for e in exps]
        print(_table(rows, ("exID", "PI", "kind", "facility", "ends", "title")))


class ExperimentPublish(LabvaultCommand):
    name = "labvault-experiment-publish"
    description = "Make an experiment public (its PI's request; never for proprietary data): labvault experiment publish EXID"
    nargs, usage = (1, 1), "EXID"

    def run(self):
        ops.publish_experiment(self.factory, self.actor, self.extra_args[0])
        print(f"labvault: {self.extra_args[0]} is public")


class ExperimentCommand(LabvaultCommand):
    name = "labvault-experiment"
    description = "Experiments."
    subcommands = {"add": _sub(ExperimentAdd, ExperimentAdd.description),
                   "publish": _sub(ExperimentPublish, ExperimentPublish.description),
                   "list": _sub(ExperimentList, ExperimentList.description)}


# ---------------------------------------------------------------------------------------
class RoleGrantCmd(LabvaultCommand):
    name = "labvault-role-grant"
    description = "Grant a role: labvault role grant EXID USER ROLE [--expires DATE] [--by USER]"
    nargs, usage = (3, 3), "EXID USER ROLE"
    expires = Unicode("", help="The grant ends at this time (ISO).").tag(config=True)
    by = Unicode("", help="Act as this user (default: the operator acts for the experiment's PI).").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "expires": "RoleGrantCmd.expires", "by": "RoleGrantCmd.by"}

    def run(self):
        exid, user, role = self.extra_args
        ops.grant_role(self.factory, self.actor_as(self.by), exid, user, role,
                       expires_at=parse_time(self.expires, "--expires") if self.expires else None)
        print(f"labvault: {user} is {role} on {exid}")


class RoleRevokeCmd(LabvaultCommand):
    name = "labvault-role-revoke"
    description = "Revoke roles: labvault role revoke EXID USER [ROLE] [--by USER] (history is kept)"
    nargs, usage = (2, 3), "EXID USER [ROLE]"
    by = Unicode("", help="Act as this user (default: the operator acts for the experiment's PI).").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "by": "RoleRevokeCmd.by"}

    def run(self):
        exid, user, *role = self.extra_args
        n = ops.revoke_role(self.factory, self.actor_as(self.by), exid, user, role[0] if role else None)
        print(f"labvault: {n} grant(s) of {user} on {exid} revoked")


class RoleListCmd(LabvaultCommand):
    name = "labvault-role-list"
    description = "List the role history of an experiment: labvault role list EXID"
    nargs, usage = (1, 1), "EXID"

    def run(self):
        from .models import RoleGrant, User

        with self.factory() as s:
            e = ops.get_experiment(s, self.extra_args[0])
            names = dict(s.execute(select(User.id, User.name)).all())
            grants = s.scalars(select(RoleGrant).where(RoleGrant.experiment_id == e.id).order_by(RoleGrant.granted_at)).all()
            rows = [(names.get(e.pi_id), "pi (owner)", "", "", "")]
            rows += [(names.get(g.user_id), g.role.value, f"{g.granted_at:%Y-%m-%d %H:%M}",
                      f"{g.expires_at:%Y-%m-%d}" if g.expires_at else "",
                      f"{g.revoked_at:%Y-%m-%d %H:%M}" if g.revoked_at else "") for g in grants]
        print(_table(rows, ("user", "role", "granted", "expires", "revoked")))


class RoleCommand(LabvaultCommand):
    name = "labvault-role"
    description = "Roles on experiments."
    subcommands = {"grant": _sub(RoleGrantCmd, RoleGrantCmd.description),
                   "revoke": _sub(RoleRevokeCmd, RoleRevokeCmd.description),
                   "list": _sub(RoleListCmd, RoleListCmd.description)}


# ---------------------------------------------------------------------------------------
class LicenceAdd(LabvaultCommand):
    name = "labvault-licence-add"
    description = "Record a licence: labvault licence add INSTITUTION PRODUCT [--valid-until DATE] [--seats N]"
    nargs, usage = (2, 2), "INSTITUTION PRODUCT"
    valid_until = Unicode("", help="Last valid day (ISO); empty = perpetual.").tag(config=True)
    seats = Int(0, help="Seats (0 = unlimited).").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "valid-until": "LicenceAdd.valid_until", "seats": "LicenceAdd.seats"}

    def run(self):
        inst, product = self.extra_args
        if self.seats < 0:
            raise CommandError("--seats must not be negative")
        ops.add_licence(self.factory, self.actor, inst, product,
                        valid_until=parse_time(self.valid_until, "--valid-until") if self.valid_until else None,
                        seats=self.seats or None)
        print(f"labvault: {inst} holds {product}")


class LicenceCommand(LabvaultCommand):
    name = "labvault-licence"
    description = "Licences held by institutions."
    subcommands = {"add": _sub(LicenceAdd, LicenceAdd.description)}


# ---------------------------------------------------------------------------------------
class EnvironmentAdd(LabvaultCommand):
    name = "labvault-environment-add"
    description = "Add an environment: labvault environment add NAME --image IMG [--licence P] [--proprietary --institution I]"
    nargs, usage = (1, 1), "NAME"
    image = Unicode("", help="Container image.").tag(config=True)
    kernelspec = Unicode("", help="Kernelspec name (local deployments).").tag(config=True)
    display_name = Unicode("", help="Name shown in the spawn form.").tag(config=True)
    licences = List(Unicode(), help="Licensed product it needs (repeat).").tag(config=True)
    proprietary = Bool(False, help="A custom proprietary environment (its institution only, never public).").tag(config=True)
    institution = Unicode("", help="Owning institution of a proprietary environment.").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "image": "EnvironmentAdd.image", "kernelspec": "EnvironmentAdd.kernelspec",
               "display-name": "EnvironmentAdd.display_name", "licence": "EnvironmentAdd.licences",
               "institution": "EnvironmentAdd.institution"}
    flags = {"proprietary": ({"EnvironmentAdd": {"proprietary": True}}, proprietary.help)}

    def run(self):
        ops.add_environment(self.factory, self.actor, self.extra_args[0], display_name=self.display_name,
                            image=self.image or None, kernelspec=self.kernelspec or None,
                            licences=self.licences, proprietary=self.proprietary,
                            institution=self.institution or None)
        print(f"labvault: environment {self.extra_args[0]!r} added")


class EnvironmentList(LabvaultCommand):
    name = "labvault-environment-list"
    description = "List environments; with --as USER, whether USER may use each and why."
    as_user = Unicode("", help="Decide for this user.").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "as": "EnvironmentList.as_user"}

    def run(self):
        from labvault import policies as p

        from .access import load_subject
        from .models import Environment

        now = datetime.now(timezone.utc)
        with self.factory() as s:
            envs = s.scalars(select(Environment).order_by(Environment.name)).all()
            subject = load_subject(s, ops.get_user(s, self.as_user), now) if self.as_user else None
            rows = []
            for env in envs:
                row = [env.name, env.image or env.kernelspec, ", ".join(env.licences) or "-",
                       "proprietary" if env.proprietary else ""]
                if subject is not None:
                    d = p.decide(subject, "use", p.Environment(env.id, env.name, frozenset(env.licences),
                                                               env.proprietary, env.institution_id), now)
                    row.append(("yes: " if d.allowed else "no: ") + d.reason)
                rows.append(tuple(row))
        header = ("environment", "image/kernelspec", "licences", "") + (("usable",) if subject else ())
        print(_table(rows, header))


class EnvironmentSync(LabvaultCommand):
    name = "labvault-environment-sync"
    description = ("Sync the environment catalogue (TOML manifests) into the database: "
                   "labvault environment sync [--catalogue DIR] [--kernels-dir DIR] [--dry-run]")
    catalogue = Unicode("", help="Directory of *.toml manifests (default: the catalogue shipped in labvault.kernels).").tag(config=True)
    kernels_dir = Unicode("", help="Also install the manifests' kernelspecs (those with argv) into this Jupyter data directory.").tag(config=True)
    dry_run = Bool(False, help="Show what would change; change nothing.").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "catalogue": "EnvironmentSync.catalogue",
               "kernels-dir": "EnvironmentSync.kernels_dir"}
    flags = {"dry-run": ({"EnvironmentSync": {"dry_run": True}}, dry_run.help)}

    def run(self):
        from labvault.kernels.catalogue import (
            CatalogueError,
            install_kernelspecs,
            load_catalogue,
            sync_catalogue,
        )

        try:
            manifests = load_catalogue(self.catalogue or None)
            report = sync_catalogue(self.factory, self.actor, manifests, dry_run=self.dry_run)
        except CatalogueError as e:
            raise CommandError(str(e)) from None
        would = "would be " if self.dry_run else ""
        for name in report.added:
            print(f"labvault: environment {name!r} {would}added")
        for name, fields in report.updated.items():
            print(f"labvault: environment {name!r} {would}updated ({', '.join(fields)})")
        for name in report.unchanged:
            print(f"labvault: environment {name!r} unchanged")
        for name in report.not_in_catalogue:
            print(f"labvault: environment {name!r} is not in the catalogue (left as it is)")
        if self.kernels_dir and not self.dry_run:
            for path in install_kernelspecs(manifests, self.kernels_dir):
                print(f"labvault: kernelspec {path}")


class EnvironmentCommand(LabvaultCommand):
    name = "labvault-environment"
    description = "Kernel environments."
    subcommands = {"add": _sub(EnvironmentAdd, EnvironmentAdd.description),
                   "list": _sub(EnvironmentList, EnvironmentList.description),
                   "sync": _sub(EnvironmentSync, EnvironmentSync.description)}


# ---------------------------------------------------------------------------------------
class AuditVerify(LabvaultCommand):
    name = "labvault-audit-verify"
    description = "Verify the audit chain; exits 1 and names the first broken event."

    def run(self):
        from . import audit

        with self.factory() as s:
            report = audit.verify(s)
        if report.ok:
            print(f"labvault: audit chain intact ({report.events} events)")
            return
        print(f"labvault: audit chain BROKEN at event {report.first_broken}: {report.problem}", file=sys.stderr)
        sys.exit(1)


class AuditList(LabvaultCommand):
    name = "labvault-audit-list"
    description = "Print the newest audit events."
    limit = Int(20, help="How many events.").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "limit": "AuditList.limit"}

    def run(self):
        from .models import AuditEvent

        with self.factory() as s:
            events = s.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(self.limit)).all()
        rows = [(e.seq, f"{e.time:%Y-%m-%d %H:%M:%S}", e.actor, e.action, e.target,
                 "allow" if e.allowed else "DENY", e.rule) for e in reversed(events)]
        print(_table(rows, ("seq", "time (UTC)", "actor", "action", "target", "decision", "rule")))


class AuditCommand(LabvaultCommand):
    name = "labvault-audit"
    description = "The audit log."
    subcommands = {"verify": _sub(AuditVerify, AuditVerify.description),
                   "list": _sub(AuditList, AuditList.description)}


# ---------------------------------------------------------------------------------------
class IngestCommand(LabvaultCommand):
    name = "labvault-ingest"
    description = ("Store files in an experiment, encrypted on every storage location: "
                   "labvault ingest EXID PATH... [--dest-prefix P] (re-run to resume)")
    nargs, usage = (2, -1), "EXID PATH..."
    dest_prefix = Unicode("", help="Folder inside the experiment to store the files under.").tag(config=True)
    by = Unicode("", help="Upload as this labvault user (decided by the policy; default: operator).").tag(config=True)
    progress = Bool(True, help="Show a progress bar on a terminal.").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "dest-prefix": "IngestCommand.dest_prefix", "by": "IngestCommand.by"}
    flags = {"no-progress": ({"IngestCommand": {"progress": False}}, "Do not show a progress bar.")}

    def run(self):
        from .store.ingest import ingest_paths

        exid, *paths = self.extra_args
        results = ingest_paths(self.chunk_store(), self.actor_as(self.by), exid, paths,
                               dest_prefix=self.dest_prefix, progress=self.progress)
        skipped = sum(r.skipped for r in results)
        print(f"labvault: {len(results) - skipped} file(s) stored, {skipped} already stored")


class FileList(LabvaultCommand):
    name = "labvault-file-list"
    description = "List the files of an experiment, with deleted stubs: labvault file list EXID"
    nargs, usage = (1, 1), "EXID"

    def run(self):
        rows = []
        for f in self.chunk_store().list_files(self.extra_args[0]):
            state = (f"deleted {f.deleted_at:%Y-%m-%d}: {f.deleted_reason}" if f.deleted_at
                     else ", ".join(f.locations))
            rows.append((f.path, f.size, (f.checksum or "")[:16], f"{f.created_at:%Y-%m-%d %H:%M}", state))
        print(_table(rows, ("path", "bytes", "sha256", "stored (UTC)", "locations")))


class FileDelete(LabvaultCommand):
    name = "labvault-file-delete"
    description = ("Permanently delete a file (crypto-shred; the PI's decision): "
                   "labvault file delete EXID PATH --reason TEXT [--by USER]")
    nargs, usage = (2, 2), "EXID PATH"
    reason = Unicode("", help="Why (shown to whoever tries to read the file afterwards).").tag(config=True)
    by = Unicode("", help="Act as this user (default: the operator acts for the experiment's PI).").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "reason": "FileDelete.reason", "by": "FileDelete.by"}

    def run(self):
        if not self.reason.strip():
            raise CommandError("--reason is required: it is shown to whoever tries to read the file")
        exid, path = self.extra_args
        info = self.chunk_store().delete_file(self.actor_as(self.by), exid, path, reason=self.reason)
        tail = "chunks removed everywhere" if info.purged_at else "some chunks remain (scrub removes them)"
        print(f"labvault: {exid}/{info.path} deleted: data key destroyed, {tail}")


class FileCommand(LabvaultCommand):
    name = "labvault-file"
    description = "Stored files."
    subcommands = {"list": _sub(FileList, FileList.description),
                   "delete": _sub(FileDelete, FileDelete.description)}


class ScrubCommand(LabvaultCommand):
    name = "labvault-scrub"
    description = ("Verify every chunk on every replica and repair from good copies: "
                   "labvault scrub [EXID]; exits 1 if damage could not be repaired.")
    nargs, usage = (0, 1), "[EXID]"
    grace = Int(-1, help="Remove crash leftovers older than this many seconds (default: ChunkStore.orphan_grace_seconds).").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "grace": "ScrubCommand.grace"}

    def run(self):
        exid = self.extra_args[0] if self.extra_args else None
        report = self.chunk_store().scrub(self.actor, exid, grace_seconds=None if self.grace < 0 else self.grace)
        counts = report.as_dict()
        for key in ("files", "chunks_verified", "bad_chunks", "replicas_ok", "replicas_repaired",
                    "replicas_restored", "mirror_copies_removed", "deleted_purged", "orphans_removed",
                    "incomplete_removed"):
            print(f"{key.replace('_', ' ')}: {counts[key]}")
        for line in report.unrecoverable:
            print(f"labvault: UNRECOVERABLE {line}", file=sys.stderr)
        for line in report.errors:
            print(f"labvault: error: {line}", file=sys.stderr)
        if not report.ok:
            sys.exit(1)


class KeysRotate(LabvaultCommand):
    name = "labvault-keys-rotate"
    description = ("Create a new master key and re-wrap every data key under it (data is not "
                   "re-encrypted); then destroy the old master keys unless --keep-old.")
    keep_old = Bool(False, help="Keep the old master key files (e.g. to open older database backups).").tag(config=True)
    flags = {"keep-old": ({"KeysRotate": {"keep_old": True}}, keep_old.help)}

    def run(self):
        report = self.chunk_store().rotate_keys(self.actor, keep_old=self.keep_old)
        print(f"labvault: new master key {report.new_key_id}; {report.rewrapped} data key(s) re-wrapped")
        for k in report.retired:
            print(f"labvault: old master key {k} destroyed")
        for k in report.kept:
            print(f"labvault: old master key {k} kept")
        for line in report.failures:
            print(f"labvault: error: {line}", file=sys.stderr)
        if report.failures:
            sys.exit(1)


class KeysList(LabvaultCommand):
    name = "labvault-keys-list"
    description = "List master keys and how many live data keys each wraps."

    def run(self):
        from sqlalchemy import func

        from .models import DataKey

        store = self.chunk_store()
        current = store.key_provider.current_key_id()
        with self.factory() as s:
            counts = dict(s.execute(select(DataKey.master_key_id, func.count()).where(
                DataKey.wrapped_key.is_not(None)).group_by(DataKey.master_key_id)).all())
        ids = list(dict.fromkeys([*store.key_provider.key_ids(), *counts]))
        rows = [(k, "yes" if k == current else "", counts.get(k, 0),
                 "" if k in store.key_provider.key_ids() else "MISSING") for k in ids]
        print(_table(rows, ("master key", "current", "data keys", "")))


class KeysCommand(LabvaultCommand):
    name = "labvault-keys"
    description = "Master keys of the chunk store."
    subcommands = {"rotate": _sub(KeysRotate, KeysRotate.description),
                   "list": _sub(KeysList, KeysList.description)}


class LifecycleRun(LabvaultCommand):
    name = "labvault-lifecycle-run"
    description = ("Run the lifecycle job once (retention expiry, notices, account states): "
                   "labvault lifecycle run [--now ISO-TIME] [--dry-run]; exits 1 if something failed (e.g. mail)")
    now = Unicode("", help="Run as if it were this time (ISO); default: now.").tag(config=True)
    dry_run = Bool(False, help="List what would happen, with the rule behind each action; change nothing.").tag(config=True)
    aliases = {**LabvaultCommand.aliases, "now": "LifecycleRun.now"}
    flags = {"dry-run": ({"LifecycleRun": {"dry_run": True}}, dry_run.help)}

    def run(self):
        from .lifecycle import LifecycleBusy, LifecycleJob
        from .mail import Mailer

        now = parse_time(self.now, "--now") if self.now else datetime.now(timezone.utc)
        job = LifecycleJob(self.factory, store=self.chunk_store(), mailer=Mailer(parent=self), parent=self)
        try:
            report = job.run(now, dry_run=self.dry_run)
        except LifecycleBusy as e:
            print(f"labvault: {e}; nothing done", file=sys.stderr)
            sys.exit(1)
        actions = report.planned if self.dry_run else report.done
        head = "would" if self.dry_run else "did"
        print(f"labvault: lifecycle at {now:%Y-%m-%d %H:%M:%S} UTC{' (dry run: nothing changed)' if self.dry_run else ''}")
        for action in actions:
            print(f"  {action.line()}")
        print(f"labvault: {head} {len(actions)} action(s)" + (f", {len(report.errors)} failed" if report.errors else ""))
        for line in report.errors:
            print(f"labvault: error: {line}", file=sys.stderr)
        if report.errors:
            sys.exit(1)


class LifecycleCommand(LabvaultCommand):
    name = "labvault-lifecycle"
    description = "The lifecycle job (docs/lifecycle.md)."
    subcommands = {"run": _sub(LifecycleRun, LifecycleRun.description)}


class DemoCommand(LabvaultCommand):
    name = "labvault-demo"
    description = "Seed the demo world (idempotent) and print what each demo user may see."

    def run(self):
        from .demo import DEMO_PASSWORD, print_world, seed, seed_data, seed_passwords

        engine = make_engine(self.db_url)
        upgrade(engine)
        created = seed(self.factory, self.actor)
        if seed_passwords(self.factory):
            print(f"labvault: demo users sign in with the password {DEMO_PASSWORD!r} (local accounts)")
        store = self.chunk_store()
        store.prepare_locations()
        stored = seed_data(self.factory, store)
        print_world(self.factory, created)
        for name in stored:
            print(f"labvault: demo data {name} (encrypted, on {len(store.locations)} replicas)")


class LabvaultApp(LabvaultCommand):
    name = "labvault"
    description = __doc__.split("\n\n")[0]
    subcommands = {
        "init": _sub(InitCommand, InitCommand.description),
        "db": _sub(DbCommand, DbCommand.description),
        "institution": _sub(InstitutionCommand, InstitutionCommand.description),
        "user": _sub(UserCommand, UserCommand.description),
        "department": _sub(DepartmentCommand, DepartmentCommand.description),
        "project": _sub(ProjectCommand, ProjectCommand.description),
        "experiment": _sub(ExperimentCommand, ExperimentCommand.description),
        "role": _sub(RoleCommand, RoleCommand.description),
        "licence": _sub(LicenceCommand, LicenceCommand.description),
        "environment": _sub(EnvironmentCommand, EnvironmentCommand.description),
        "audit": _sub(AuditCommand, AuditCommand.description),
        "ingest": _sub(IngestCommand, IngestCommand.description),
        "file": _sub(FileCommand, FileCommand.description),
        "scrub": _sub(ScrubCommand, ScrubCommand.description),
        "keys": _sub(KeysCommand, KeysCommand.description),
        "lifecycle": _sub(LifecycleCommand, LifecycleCommand.description),
        "demo": _sub(DemoCommand, DemoCommand.description),
        "mailbox": ("labvault.datastore.mail.MailboxCommand",
                    "Run the embedded default's local SMTP server (stores mail, prints links)."),
        "service": ("labvault.datastore.service.app.DatastoreService",
                    "Run the datastore service (JupyterHub starts it as the 'labvault' service)."),
    }


def main(argv=None):
    LabvaultApp.launch_instance(argv)


if __name__ == "__main__":
    main()
