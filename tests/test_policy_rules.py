"""Every named rule of the policy engine, on its allow side and on its deny side.

Each test asks :func:`check`, which asserts the exact ``allowed`` and ``rule`` of one Decision
(and, where it matters, what its reason mentions) and records ``(rule, allowed)``. The last test
of this module, :func:`test_zz_every_rule_covered`, proves that every rule of ``RULES`` was seen
on each of its sides; rules that have only one side by nature are listed in ``ALLOW_ONLY`` and
``DENY_ONLY`` with the reason why. Pure Python, no database: the whole file runs in well under a
second.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from traitlets.config import Config

from labvault.policies import (
    ACTIONS,
    ANONYMOUS,
    RULES,
    SYSTEM,
    Account,
    AccountRecord,
    Decision,
    Department,
    DepartmentAccessChange,
    Environment,
    Experiment,
    ExpiryNotice,
    File,
    Grant,
    NewExperiment,
    NewResultSet,
    Person,
    PersonalItem,
    Policy,
    Project,
    ProjectAccessChange,
    Registration,
    Result,
    ResultSet,
    RetentionChange,
    RoleChange,
    Share,
    SignIn,
    Subject,
    decide,
    truncate_ip,
)
from labvault.policies import engine as E

# ------------------------------------------------------------------------------------------
# the one-sided rules (everything else must be seen allowed AND denied)
# ------------------------------------------------------------------------------------------
ALLOW_ONLY = {
    "sharing.same_institution": "a target outside the institution falls to the PI-confirmation rule",
    "department.member_read_modify": "a non-member falls through to the project/public/deny rules",
    "department.unpublished_result_sets": "outside the department the publication rule decides",
    "derived.parent": "a child's refusal is its parent's refusal, with the parent's rule",
    "privacy.identity": "the baseline of what registered users see; refusals are members_visible",
    "privacy.personal_repository": "refusals of someone else's personal data are user.own_data",
    "privacy.data_subject_rights": "only ever the subject's own record; others get user.own_data",
    "public.open_experiment": "a non-public experiment is refused by the rule that lacks access",
    "role.grant": "without an active grant the assignment/facility/default rules refuse",
}
DENY_ONLY = {
    "proprietary.assigned_only": "being assigned shows up as role.grant / facility.access_window",
    "proprietary.never_public": "it only ever forbids publication",
    "vendor.never": "it only ever forbids (the vendor is never permitted access)",
    "retention.default_minimum": "an acceptable date is allowed by retention.pi_only",
    "retention.deleted": "deleted data is only ever refused",
    "proprietary.no_service_use": "it only ever forbids use of proprietary data by the service",
    "user.own_data": "owners are allowed by personal_repository / data_subject_rights",
    "list.hide_inaccessible": "a listed entity is allowed by the rule that allows reading it",
    "account.state": "an active account is a precondition, never a reason to allow",
    "pi.verified_institution": "a verified PI is allowed by experiment.create",
    "privacy.role_history_kept": "role history can never be deleted",
    "default.deny": "nothing is allowed by default",
    "account.adult": "a confirmed adult is registered by account.registration",
    "signin.lockout": "an unlocked account is let in by the credential / second-factor rules",
}

SEEN: set[tuple[str, bool]] = set()

# ------------------------------------------------------------------------------------------
# a small world
# ------------------------------------------------------------------------------------------
UTC = timezone.utc
START = datetime(2026, 2, 20, 8, 0, tzinfo=UTC)
END = datetime(2026, 3, 1, 18, 0, tzinfo=UTC)  # the experiment concludes
NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)  # two weeks later: inside the facility window

INST_A, INST_B, FACILITY_INST, VENDOR_INST = 1, 2, 5, 9
DEPT_A, DEPT_B, DEPT_C = 10, 11, 12
PROJ_1, PROJ_2 = 100, 101
EXP_ID, EXID = 1, "ESRF-2026-0042"

PI_ID, MANAGER_ID, WRITER_ID, VIEWER_ID, COLLEAGUE_ID = 1, 2, 3, 4, 5
OUTSIDER_ID, FACILITY_ID, VENDOR_ID, ADMIN_ID, STRANGER_ID = 6, 7, 8, 9, 10


def after_end(days: float) -> datetime:
    return END + timedelta(days=days)


def user(uid: int, *, inst: int | None = INST_A, dept: int | None = DEPT_A, name: str = "",
         read: tuple[int, ...] = (), modify: tuple[int, ...] = (),
         roles: dict[int, tuple[Grant, ...]] | None = None, **kw) -> Subject:
    """A registered, active user of a verified institution; home department read + modify."""
    home = {dept} if dept is not None else set()
    kw.setdefault("institution_verified", True)
    kw.setdefault("institutional_email_verified", True)
    return Subject(
        user_id=uid, name=name or f"user{uid}", institution_id=inst, department_id=dept,
        read_departments=frozenset(home | set(read) | set(modify)),
        modify_departments=frozenset(home | set(modify)),
        grants=roles or {}, **kw,
    )


def with_role(uid: int, role: str, exp_id: int = EXP_ID, **kw) -> Subject:
    return user(uid, roles={exp_id: (Grant(role),)}, **kw)


def experiment(**kw) -> Experiment:
    values = dict(id=EXP_ID, exid=EXID, pi_id=PI_ID, institution_id=INST_A, department_id=DEPT_A,
                  start_at=START, end_at=END, proprietary=True)
    values.update(kw)
    return Experiment(**values)


PROP = experiment()  # proprietary (the default)
OPEN = experiment(proprietary=False)  # not proprietary, not public: department/project data
PUBLIC = experiment(proprietary=False, public=True)

PI = user(PI_ID, name="Pat Investigator")
MANAGER = with_role(MANAGER_ID, "manager", name="Mia Manager")
WRITER = with_role(WRITER_ID, "writer")
VIEWER = with_role(VIEWER_ID, "viewer")
COLLEAGUE = user(COLLEAGUE_ID)  # same institution and department, no role
OUTSIDER = user(OUTSIDER_ID, inst=INST_B, dept=DEPT_C, name="Olga Outsider")
FACILITY = with_role(FACILITY_ID, "facility_staff", inst=FACILITY_INST, dept=None, is_facility=True)
VENDOR_MANAGER = with_role(VENDOR_ID, "manager", inst=VENDOR_INST, is_vendor=True, name="Vic Vendor")
VENDOR_ADMIN = user(VENDOR_ID + 100, inst=VENDOR_INST, is_vendor=True, is_admin=True)
ADMIN = user(ADMIN_ID, is_admin=True)
STRANGER = user(STRANGER_ID, dept=DEPT_B)  # same institution, another department, no role


def check(subject: Subject, action: str, resource: object, now: datetime = NOW, *,
          allowed: bool, rule: str, mentions: tuple[str, ...] | str = (),
          policy: Policy | None = None) -> Decision:
    """Decide, assert the exact outcome and rule (and what the reason mentions), record it."""
    d = policy.decide(subject, action, resource, now) if policy else decide(subject, action, resource, now)
    SEEN.add((d.rule, d.allowed))
    assert (d.allowed, d.rule) == (allowed, rule), d
    assert isinstance(d.reason, str) and d.reason.strip(), d
    for word in (mentions,) if isinstance(mentions, str) else mentions:
        assert word in d.reason, (word, d)
    return d


def allow(subject, action, resource, rule, now=NOW, **kw) -> Decision:
    return check(subject, action, resource, now, allowed=True, rule=rule, **kw)


def deny(subject, action, resource, rule, now=NOW, **kw) -> Decision:
    return check(subject, action, resource, now, allowed=False, rule=rule, **kw)


# ------------------------------------------------------------------------------------------
# account states
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("state", ["tentative", "deactivated", "closed"])
def test_inactive_accounts_have_no_access(state):
    deny(replace(VIEWER, state=state), E.READ, PROP, "account.state", mentions=state)
    deny(replace(COLLEAGUE, state=state), E.READ, OPEN, "account.state", mentions=state)
    deny(replace(PI, state=state), E.READ, PROP, "account.state")
    deny(replace(PI, state=state), E.ARCHIVE, PROP, "account.state")
    deny(replace(MANAGER, state=state), E.GRANT_ROLE, RoleChange(PROP, COLLEAGUE, "viewer"),
         "account.state")
    deny(replace(ADMIN, state=state), E.MANAGE_ACCESS,
         DepartmentAccessChange(Department(DEPT_B), COLLEAGUE), "account.state")
    deny(replace(COLLEAGUE, state=state), E.USE, Environment(1, "python"), "account.state")
    # ...while the same account, active, is let in
    allow(VIEWER, E.READ, PROP, "role.grant")
    allow(COLLEAGUE, E.READ, OPEN, "department.member_read_modify")


def test_anonymous_visitors_see_only_public_experiments():
    deny(ANONYMOUS, E.READ, OPEN, "account.state", mentions="sign in")
    allow(ANONYMOUS, E.READ, PUBLIC, "public.open_experiment", mentions=EXID)
    deny(ANONYMOUS, E.READ, PROP, "proprietary.never_public", mentions=EXID)
    deny(ANONYMOUS, E.ARCHIVE, OPEN, "account.state")
    deny(ANONYMOUS, E.SHARE, Share(OPEN, COLLEAGUE), "account.state")


def test_role_changes_need_an_active_target():
    for state in ("tentative", "closed"):
        deny(PI, E.GRANT_ROLE, RoleChange(PROP, replace(COLLEAGUE, state=state), "viewer"),
             "account.state")
    deny(PI, E.GRANT_ROLE, RoleChange(PROP, ANONYMOUS, "viewer"), "account.state")


# ------------------------------------------------------------------------------------------
# proprietary data: the PI owns it, only assigned users access it, it is never public
# ------------------------------------------------------------------------------------------
def test_pi_owns_proprietary_data():
    allow(PI, E.READ, PROP, "proprietary.pi_owner", mentions=EXID)
    allow(PI, E.MODIFY, PROP, "proprietary.pi_owner")
    allow(PI, E.UPLOAD, File(PROP, "raw/scan_0001.h5"), "proprietary.pi_owner")
    # the PI's ownership cannot be revoked, not even by the PI
    deny(PI, E.REVOKE_ROLE, RoleChange(PROP, PI, "viewer"), "proprietary.pi_owner")
    deny(MANAGER, E.REVOKE_ROLE, RoleChange(PROP, PI, "viewer"), "proprietary.pi_owner")


def test_only_users_the_pi_assigned_access_proprietary_data():
    # a colleague of the same institution and department, without a role: refused
    deny(COLLEAGUE, E.READ, PROP, "proprietary.assigned_only", mentions=EXID)
    deny(COLLEAGUE, E.READ, File(PROP, "raw/a.h5"), "proprietary.assigned_only")
    deny(replace(COLLEAGUE, is_admin=True), E.READ, PROP, "proprietary.assigned_only")
    # department membership and project access do not open proprietary data
    deny(user(COLLEAGUE_ID, modify=(DEPT_A,), projects=frozenset({PROJ_1})), E.READ,
         replace(PROP, project_ids=frozenset({PROJ_1})), "proprietary.assigned_only")
    # once assigned, in
    for role in ("manager", "writer", "viewer"):
        allow(with_role(COLLEAGUE_ID, role), E.READ, PROP, "role.grant", mentions=(role, EXID))
    # a grant for another experiment does not count
    deny(with_role(COLLEAGUE_ID, "manager", exp_id=2), E.READ, PROP, "proprietary.assigned_only")


def test_expired_and_revoked_grants_close_access():
    expired = user(VIEWER_ID, roles={EXP_ID: (Grant("viewer", expires_at=NOW - timedelta(hours=1)),)})
    deny(expired, E.READ, PROP, "proprietary.assigned_only")
    allow(expired, E.READ, PROP, "role.grant", NOW - timedelta(hours=2))
    revoked = user(VIEWER_ID, roles={EXP_ID: (Grant("viewer", revoked_at=NOW),)})
    deny(revoked, E.READ, PROP, "proprietary.assigned_only")
    allow(revoked, E.READ, PROP, "role.grant", NOW - timedelta(seconds=1))


def test_proprietary_data_is_never_public():
    deny(PI, E.PUBLISH, PROP, "proprietary.never_public", mentions=EXID)
    deny(ADMIN, E.PUBLISH, PROP, "proprietary.never_public")
    deny(SYSTEM, E.PUBLISH, PROP, "proprietary.never_public")
    # even a row wrongly marked public is not shown to visitors
    deny(ANONYMOUS, E.READ, replace(PROP, public=True), "proprietary.never_public")
    deny(ANONYMOUS, E.STUB, PROP, "stub.existence")


def test_only_the_pi_makes_non_proprietary_experiments_public():
    allow(PI, E.PUBLISH, OPEN, "public.open_experiment", mentions=EXID)
    deny(MANAGER, E.PUBLISH, OPEN, "retention.pi_only", mentions=EXID)
    deny(ADMIN, E.PUBLISH, OPEN, "retention.pi_only")
    allow(PI, E.UNPUBLISH, PUBLIC, "public.open_experiment")
    deny(WRITER, E.UNPUBLISH, PUBLIC, "retention.pi_only")
    allow(ANONYMOUS, E.READ, PUBLIC, "public.open_experiment")
    allow(OUTSIDER, E.READ, PUBLIC, "public.open_experiment")
    allow(ANONYMOUS, E.READ, File(PUBLIC, "raw/a.h5"), "derived.parent", mentions=EXID)
    deny(OUTSIDER, E.MODIFY, PUBLIC, "modify.authorised_roles")


# ------------------------------------------------------------------------------------------
# facility staff: access ends experiment end + 30 days (configurable), mid-session
# ------------------------------------------------------------------------------------------
def test_facility_staff_access_ends_thirty_days_after_the_experiment():
    day29, day31 = after_end(29), after_end(31)
    allow(FACILITY, E.READ, PROP, "facility.access_window", day29, mentions=(EXID, "2026-03-31"))
    # same subject, same session, a later moment: the read is refused
    deny(FACILITY, E.READ, PROP, "facility.access_window", day31,
         mentions=(EXID, "2026-03-31", "30 days"))
    deny(FACILITY, E.READ, File(PROP, "raw/a.h5"), "facility.access_window", day31)
    allow(FACILITY, E.READ, File(PROP, "raw/a.h5"), "derived.parent", day29)
    # the boundary itself is closed; a second before it is open
    deny(FACILITY, E.READ, PROP, "facility.access_window", after_end(30))
    allow(FACILITY, E.READ, PROP, "facility.access_window", after_end(30) - timedelta(seconds=1))
    # an experiment that has not concluded keeps its facility staff
    allow(FACILITY, E.READ, replace(PROP, end_at=None), "facility.access_window", after_end(400),
          mentions="while the experiment runs")


def test_facility_access_days_is_a_trait():
    short = Policy(facility_access_days=10)
    allow(FACILITY, E.READ, PROP, "facility.access_window", after_end(9), policy=short,
          mentions="2026-03-11")
    deny(FACILITY, E.READ, PROP, "facility.access_window", after_end(11), policy=short,
         mentions=("2026-03-11", "10 days"))
    # changed on a live policy object (mid-life), the window follows
    live = Policy()
    allow(FACILITY, E.READ, PROP, "facility.access_window", after_end(29), policy=live)
    live.facility_access_days = 10
    deny(FACILITY, E.READ, PROP, "facility.access_window", after_end(29), policy=live)
    assert live.facility_access_ends(PROP) == after_end(10)
    # and from ordinary configuration
    configured = Policy(config=Config({"Policy": {"facility_access_days": 60}}))
    allow(FACILITY, E.READ, PROP, "facility.access_window", after_end(45), policy=configured)


def test_facility_staff_upload_but_do_not_modify():
    allow(FACILITY, E.UPLOAD, PROP, "facility.access_window", after_end(1))
    allow(FACILITY, E.UPLOAD, File(PROP, "raw/b.h5"), "facility.access_window", after_end(1))
    deny(FACILITY, E.UPLOAD, PROP, "facility.access_window", after_end(31))
    deny(FACILITY, E.MODIFY, PROP, "modify.authorised_roles", after_end(1))


def test_facility_window_on_non_proprietary_data_and_pi_assignment():
    # non-proprietary data and no other access: the window still decides
    deny(FACILITY, E.READ, OPEN, "facility.access_window", after_end(31), mentions="2026-03-31")
    # a role the PI assigned outlives the facility window
    both = user(FACILITY_ID, inst=FACILITY_INST, dept=None,
                roles={EXP_ID: (Grant("facility_staff"), Grant("viewer"))})
    allow(both, E.READ, PROP, "role.grant", after_end(31))


# ------------------------------------------------------------------------------------------
# the vendor (DECTRIS) never accesses proprietary data, whatever its roles or admin flag
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vendor", [VENDOR_MANAGER, VENDOR_ADMIN,
                                    replace(VENDOR_MANAGER, is_admin=True)],
                         ids=["pi-granted-manager", "admin", "manager-and-admin"])
def test_vendor_never_accesses_proprietary_data(vendor):
    rs = ResultSet(7, PROP, DEPT_A, published=True)
    for action, resource in [
        (E.READ, PROP), (E.MODIFY, PROP), (E.UPLOAD, PROP),
        (E.READ, File(PROP, "raw/a.h5")), (E.MODIFY, File(PROP, "raw/a.h5")),
        (E.UPLOAD, File(PROP, "raw/a.h5")), (E.READ, rs), (E.READ, Result(rs)),
        (E.READ, Result(PROP, "comment")), (E.UPLOAD_RESULTS, NewResultSet(PROP)),
        (E.READ_ACTIVITY, PROP), (E.READ_AUDIT, PROP),
        (E.GRANT_ROLE, RoleChange(PROP, COLLEAGUE, "viewer")),
        (E.SHARE, Share(PROP, COLLEAGUE)),
    ]:
        deny(vendor, action, resource, "vendor.never", mentions="vendor")
    deny(vendor, E.LIST, PROP, "list.hide_inaccessible", mentions="vendor")
    deny(vendor, E.LIST, rs, "list.hide_inaccessible")
    deny(vendor, E.STUB, PROP, "stub.existence")
    # non-proprietary data is not covered by the vendor rule
    allow(vendor, E.READ, OPEN, "role.grant" if vendor.grants else "department.member_read_modify")


@pytest.mark.parametrize("role", ["manager", "writer", "viewer", "facility_staff"])
@pytest.mark.parametrize("target", [VENDOR_MANAGER, VENDOR_ADMIN], ids=["vendor", "vendor-admin"])
def test_vendor_cannot_be_assigned_to_proprietary_data(role, target):
    deny(PI, E.GRANT_ROLE, RoleChange(PROP, target, role), "vendor.never", mentions="vendor")
    deny(PI, E.SHARE, Share(PROP, target), "vendor.never")
    deny(PI, E.CONFIRM_SHARE, Share(PROP, target, requested_by=MANAGER_ID), "vendor.never")
    # a non-proprietary experiment may be shared with them (the PI confirms, they are outside)
    allow(PI, E.GRANT_ROLE, RoleChange(OPEN, target, role), "sharing.cross_institution_pi_confirm")


def test_vendor_cannot_own_proprietary_experiments():
    vendor_pi = user(VENDOR_ID, inst=VENDOR_INST, is_vendor=True)
    deny(ADMIN, E.CREATE, NewExperiment(vendor_pi), "vendor.never")
    deny(vendor_pi, E.CREATE, NewExperiment(vendor_pi), "vendor.never")
    allow(vendor_pi, E.CREATE, NewExperiment(vendor_pi, proprietary=False), "experiment.create")


# ------------------------------------------------------------------------------------------
# sharing: free inside the institution, outside only once the PI confirms
# ------------------------------------------------------------------------------------------
def test_sharing_inside_the_institution_is_free():
    allow(MANAGER, E.SHARE, Share(PROP, COLLEAGUE), "sharing.same_institution")
    allow(PI, E.SHARE, Share(PROP, COLLEAGUE), "sharing.same_institution")
    allow(MANAGER, E.GRANT_ROLE, RoleChange(PROP, COLLEAGUE, "writer"), "sharing.same_institution")
    # non-proprietary data: anybody who reads it shares it inside the institution
    allow(COLLEAGUE, E.SHARE, Share(OPEN, STRANGER), "sharing.same_institution")


def test_sharing_outside_the_institution_needs_the_pi():
    share = Share(PROP, OUTSIDER, requested_by=MANAGER_ID)
    deny(MANAGER, E.SHARE, share, "sharing.cross_institution_pi_confirm", mentions="Olga Outsider")
    deny(MANAGER, E.GRANT_ROLE, RoleChange(PROP, OUTSIDER, "viewer"),
         "sharing.cross_institution_pi_confirm", mentions="pending PI confirmation")
    deny(COLLEAGUE, E.SHARE, Share(OPEN, OUTSIDER), "sharing.cross_institution_pi_confirm")
    # the PI confirms...
    allow(PI, E.CONFIRM_SHARE, share, "sharing.cross_institution_pi_confirm", mentions="PI")
    allow(PI, E.SHARE, share, "sharing.cross_institution_pi_confirm")
    allow(PI, E.GRANT_ROLE, RoleChange(PROP, OUTSIDER, "viewer"), "sharing.cross_institution_pi_confirm")
    # ...and nobody else does
    for other in (MANAGER, WRITER, ADMIN, OUTSIDER, replace(ADMIN, is_vendor=True)):
        deny(other, E.CONFIRM_SHARE, share, "sharing.cross_institution_pi_confirm")
    deny(ANONYMOUS, E.CONFIRM_SHARE, share, "account.state")


def test_an_unverified_institution_counts_as_outside():
    claimed = replace(COLLEAGUE, institution_verified=False)
    deny(MANAGER, E.SHARE, Share(PROP, claimed), "sharing.cross_institution_pi_confirm")
    allow(PI, E.SHARE, Share(PROP, claimed), "sharing.cross_institution_pi_confirm")


def test_only_pi_and_managers_share_proprietary_data():
    deny(WRITER, E.SHARE, Share(PROP, COLLEAGUE), "proprietary.assigned_only", mentions=EXID)
    deny(VIEWER, E.SHARE, Share(PROP, COLLEAGUE), "proprietary.assigned_only")
    deny(COLLEAGUE, E.SHARE, Share(PROP, STRANGER), "proprietary.assigned_only")
    deny(PI, E.SHARE, Share(None, COLLEAGUE), "default.deny")


def test_project_sharing():
    project = Project(PROJ_1, pi_id=PI_ID, institution_id=INST_A)
    member = user(COLLEAGUE_ID, projects=frozenset({PROJ_1}))
    allow(member, E.SHARE, Share(None, STRANGER, project=project), "sharing.same_institution")
    deny(member, E.SHARE, Share(None, OUTSIDER, project=project), "sharing.cross_institution_pi_confirm")
    allow(PI, E.SHARE, Share(None, OUTSIDER, project=project), "sharing.cross_institution_pi_confirm")
    deny(STRANGER, E.SHARE, Share(None, COLLEAGUE, project=project), "project.read_only")
    deny(member, E.SHARE, Share(None, replace(STRANGER, state="closed"), project=project),
         "account.state")
    allow(PI, E.CONFIRM_SHARE, Share(None, OUTSIDER, project=project), "sharing.cross_institution_pi_confirm")
    deny(member, E.CONFIRM_SHARE, Share(None, OUTSIDER, project=project),
         "sharing.cross_institution_pi_confirm")


# ------------------------------------------------------------------------------------------
# roles: managed by the PI and the managers the PI appointed
# ------------------------------------------------------------------------------------------
def test_role_management():
    allow(MANAGER, E.REVOKE_ROLE, RoleChange(PROP, VIEWER, "viewer"), "role.manage", mentions=EXID)
    allow(PI, E.REVOKE_ROLE, RoleChange(PROP, MANAGER, "manager"), "role.manage")
    deny(WRITER, E.GRANT_ROLE, RoleChange(PROP, COLLEAGUE, "viewer"), "role.manage", mentions=EXID)
    deny(ADMIN, E.GRANT_ROLE, RoleChange(PROP, COLLEAGUE, "viewer"), "role.manage")
    deny(MANAGER, E.GRANT_ROLE, RoleChange(PROP, COLLEAGUE, "manager"), "role.manage",
         mentions="only the PI appoints managers")
    deny(MANAGER, E.REVOKE_ROLE, RoleChange(PROP, VIEWER, "manager"), "role.manage")
    allow(PI, E.GRANT_ROLE, RoleChange(PROP, COLLEAGUE, "manager"), "sharing.same_institution")
    deny(PI, E.GRANT_ROLE, RoleChange(PROP, COLLEAGUE, "pi"), "role.manage", mentions="owner")
    deny(PI, E.GRANT_ROLE, RoleChange(PROP, COLLEAGUE, "owner"), "role.manage", mentions="unknown role")
    # an expired manager grant manages nothing
    lapsed = user(MANAGER_ID, roles={EXP_ID: (Grant("manager", expires_at=NOW - timedelta(days=1)),)})
    deny(lapsed, E.GRANT_ROLE, RoleChange(PROP, COLLEAGUE, "viewer"), "role.manage")
    allow(lapsed, E.GRANT_ROLE, RoleChange(PROP, COLLEAGUE, "viewer"), "sharing.same_institution",
          NOW - timedelta(days=2))


# ------------------------------------------------------------------------------------------
# modification: only writer and above (or department modify rights on non-proprietary data)
# ------------------------------------------------------------------------------------------
def test_only_writers_and_up_modify_proprietary_data():
    deny(VIEWER, E.MODIFY, PROP, "modify.authorised_roles", mentions=(EXID, "writer"))
    deny(VIEWER, E.UPLOAD, File(PROP, "raw/a.h5"), "modify.authorised_roles")
    allow(WRITER, E.MODIFY, PROP, "modify.authorised_roles", mentions="writer")
    allow(WRITER, E.UPLOAD, File(PROP, "raw/a.h5"), "modify.authorised_roles")
    allow(MANAGER, E.MODIFY, File(PROP, "raw/a.h5"), "modify.authorised_roles", mentions="manager")
    deny(COLLEAGUE, E.MODIFY, PROP, "proprietary.assigned_only")  # not even readable
    # department modify rights do not open proprietary data for changes either
    dept_viewer = with_role(VIEWER_ID, "viewer", modify=(DEPT_A,))
    deny(dept_viewer, E.MODIFY, PROP, "modify.authorised_roles")


def test_department_members_modify_non_proprietary_data():
    allow(COLLEAGUE, E.MODIFY, OPEN, "department.member_read_modify", mentions=EXID)
    reader = user(STRANGER_ID, dept=DEPT_B, read=(DEPT_A,))
    allow(reader, E.READ, OPEN, "department.member_read_modify")
    deny(reader, E.MODIFY, OPEN, "modify.authorised_roles", mentions="department")
    modifier = user(STRANGER_ID, dept=DEPT_B, modify=(DEPT_A,))
    allow(modifier, E.MODIFY, OPEN, "department.member_read_modify")
    allow(modifier, E.UPLOAD, File(OPEN, "raw/c.h5"), "department.member_read_modify")


# ------------------------------------------------------------------------------------------
# retention: the PI alone extends, archives, deletes; one year minimum; expiry deletes
# ------------------------------------------------------------------------------------------
ARCHIVED_AT = datetime(2026, 4, 1, tzinfo=UTC)
ARCHIVED = replace(PROP, status="archived", archived_at=ARCHIVED_AT,
                   retain_until=ARCHIVED_AT + timedelta(days=365))
DELETED = replace(ARCHIVED, deleted_at=datetime(2027, 4, 2, tzinfo=UTC))
LATER = datetime(2026, 5, 1, tzinfo=UTC)


def test_only_the_pi_archives_extends_and_deletes():
    for action in (E.ARCHIVE, E.DELETE, E.AGREE_MIRROR):
        allow(PI, action, PROP, "retention.pi_only", mentions=EXID)
        for other in (MANAGER, WRITER, ADMIN, COLLEAGUE):
            deny(other, action, PROP, "retention.pi_only", mentions=EXID)
    until = ARCHIVED_AT + timedelta(days=800)
    allow(PI, E.EXTEND, RetentionChange(ARCHIVED, until), "retention.pi_only", LATER,
          mentions="2028-06-09")
    for other in (MANAGER, ADMIN):
        deny(other, E.EXTEND, RetentionChange(ARCHIVED, until), "retention.pi_only", LATER)
    deny(SYSTEM, E.EXTEND, RetentionChange(ARCHIVED, until), "account.state", LATER)


def test_retention_minimum_is_one_year():
    floor = ARCHIVED_AT + timedelta(days=365)
    allow(PI, E.EXTEND, RetentionChange(ARCHIVED, floor), "retention.pi_only", LATER)
    deny(PI, E.EXTEND, RetentionChange(ARCHIVED, floor - timedelta(days=1)),
         "retention.default_minimum", LATER, mentions=("365 days", "2027-04-01"))
    deny(PI, E.EXTEND, RetentionChange(ARCHIVED, None), "retention.default_minimum", LATER)
    # not archived yet: the year counts from now
    deny(PI, E.EXTEND, RetentionChange(PROP, NOW + timedelta(days=200)), "retention.default_minimum")
    allow(PI, E.EXTEND, RetentionChange(PROP, NOW + timedelta(days=366)), "retention.pi_only")


def test_retention_minimum_days_is_a_trait():
    month = Policy(retention_minimum_days=30)
    shorter = RetentionChange(ARCHIVED, ARCHIVED_AT + timedelta(days=31))
    allow(PI, E.EXTEND, shorter, "retention.pi_only", LATER, policy=month)
    deny(PI, E.EXTEND, shorter, "retention.default_minimum", LATER)
    live = Policy()
    live.retention_minimum_days = 30
    allow(PI, E.EXTEND, shorter, "retention.pi_only", LATER, policy=live)
    assert live.minimum_retain_until(ARCHIVED_AT) == ARCHIVED_AT + timedelta(days=30)


def test_the_system_expires_data_only_after_retain_until():
    until = ARCHIVED.retain_until
    deny(SYSTEM, E.EXPIRE, ARCHIVED, "retention.expiry_deletes", until - timedelta(seconds=1),
         mentions=(EXID, "2027-04-01"))
    allow(SYSTEM, E.EXPIRE, ARCHIVED, "retention.expiry_deletes", until, mentions="2027-04-01")
    allow(SYSTEM, E.DELETE, ARCHIVED, "retention.expiry_deletes", until + timedelta(days=3))
    deny(SYSTEM, E.EXPIRE, PROP, "retention.expiry_deletes", mentions="not archived")
    # extended: not expired any more
    extended = replace(ARCHIVED, retain_until=until + timedelta(days=365))
    deny(SYSTEM, E.EXPIRE, extended, "retention.expiry_deletes", until + timedelta(days=3))
    # only the lifecycle job expires, and only once
    deny(PI, E.EXPIRE, ARCHIVED, "retention.pi_only", until + timedelta(days=3))
    deny(ADMIN, E.EXPIRE, ARCHIVED, "retention.pi_only", until + timedelta(days=3))
    deny(SYSTEM, E.EXPIRE, DELETED, "retention.deleted", until + timedelta(days=3))


def test_deleted_data_cannot_be_read_or_changed():
    later = DELETED.deleted_at + timedelta(days=1)
    deny(PI, E.READ, File(DELETED, "raw/a.h5"), "retention.deleted", later, mentions=(EXID, "2027-04-02"))
    deny(VIEWER, E.READ, File(DELETED, "raw/a.h5"), "retention.deleted", later)
    deny(PI, E.UPLOAD, DELETED, "retention.deleted", later)  # engine fix: PI upload after deletion
    deny(PI, E.MODIFY, File(DELETED, "raw/a.h5"), "retention.deleted", later)
    deny(WRITER, E.MODIFY, DELETED, "retention.deleted", later)
    deny(PI, E.ARCHIVE, DELETED, "retention.deleted", later)
    deny(PI, E.DELETE, DELETED, "retention.deleted", later)
    deny(PI, E.UPLOAD_RESULTS, NewResultSet(DELETED), "retention.deleted", later)
    # the metadata stub remains
    allow(PI, E.READ, DELETED, "proprietary.pi_owner", later)


def test_expiry_never_cuts_the_minimum_storage_period_short():
    # a retain_until below archive time + 1 year (hand-edited, or an old configuration)
    short = replace(ARCHIVED, retain_until=ARCHIVED_AT + timedelta(days=100))
    deny(SYSTEM, E.EXPIRE, short, "retention.default_minimum", ARCHIVED_AT + timedelta(days=200),
         mentions="2027-04-01")
    allow(SYSTEM, E.EXPIRE, short, "retention.expiry_deletes", ARCHIVED_AT + timedelta(days=365))


# ------------------------------------------------------------------------------------------
# the lifecycle job: notices, and accounts that are tentative, closed or of minors
# ------------------------------------------------------------------------------------------
EXPIRES = ARCHIVED.retain_until  # 2027-04-01


def test_retention_notices_30_and_7_days_before_expiry():
    n30, n7 = ExpiryNotice(ARCHIVED, "retention", 30), ExpiryNotice(ARCHIVED, "retention", 7)
    before = EXPIRES - timedelta(days=30, seconds=1)
    deny(SYSTEM, E.NOTIFY, n30, "retention.expiry_notice", before, mentions="no notice is due before 2027-03-02")
    allow(SYSTEM, E.NOTIFY, n30, "retention.expiry_notice", EXPIRES - timedelta(days=30), mentions="2027-04-01")
    deny(SYSTEM, E.NOTIFY, n7, "retention.expiry_notice", EXPIRES - timedelta(days=8))
    allow(SYSTEM, E.NOTIFY, n7, "retention.expiry_notice", EXPIRES - timedelta(days=7))
    # inside the 7-day window the 30-day notice is no longer the one due
    deny(SYSTEM, E.NOTIFY, n30, "retention.expiry_notice", EXPIRES - timedelta(days=2), mentions="7-day")
    deny(SYSTEM, E.NOTIFY, n7, "retention.expiry_notice", EXPIRES, mentions="too late")
    deny(SYSTEM, E.NOTIFY, ExpiryNotice(PROP, "retention", 30), "retention.expiry_notice", mentions="not archived")
    deny(SYSTEM, E.NOTIFY, ExpiryNotice(DELETED, "retention", 7), "retention.deleted", EXPIRES - timedelta(days=3))
    deny(PI, E.NOTIFY, n7, "retention.expiry_notice", EXPIRES - timedelta(days=3), mentions="lifecycle job")
    deny(SYSTEM, E.NOTIFY, ExpiryNotice(ARCHIVED, "gossip", 7), "default.deny")
    policy = Policy()
    assert policy.retention_notice_due(ARCHIVED, EXPIRES - timedelta(days=31)) is None
    assert policy.retention_notice_due(ARCHIVED, EXPIRES - timedelta(days=12)) == 30
    assert policy.retention_notice_due(ARCHIVED, EXPIRES - timedelta(seconds=1)) == 7
    assert policy.retention_notice_due(ARCHIVED, EXPIRES) is None


def test_facility_staff_are_told_before_their_access_ends():
    ends = END + timedelta(days=30)
    n7 = ExpiryNotice(PROP, "facility_access", 7)
    deny(SYSTEM, E.NOTIFY, n7, "facility.access_notice", ends - timedelta(days=7, seconds=1))
    allow(SYSTEM, E.NOTIFY, n7, "facility.access_notice", ends - timedelta(days=7), mentions="2026-03-31")
    deny(SYSTEM, E.NOTIFY, n7, "facility.access_notice", ends, mentions="too late")
    deny(SYSTEM, E.NOTIFY, ExpiryNotice(replace(PROP, end_at=None), "facility_access", 7),
         "facility.access_notice", mentions="has not ended")
    custom = Policy(config=Config({"Policy": {"facility_notice_days": [3]}}))
    check(SYSTEM, E.NOTIFY, n7, ends - timedelta(days=5), allowed=False, rule="facility.access_notice",
          policy=custom)
    check(SYSTEM, E.NOTIFY, ExpiryNotice(PROP, "facility_access", 3), ends - timedelta(days=2),
          allowed=True, rule="facility.access_notice", policy=custom)


def account(**kw) -> AccountRecord:
    return AccountRecord(**{"user_id": COLLEAGUE_ID, "state": "active", "created_at": NOW - timedelta(days=400),
                            **kw})


def test_unconfirmed_accounts_lose_their_personal_data_after_12_months():
    created = NOW - timedelta(days=100)
    tentative = account(state="tentative", created_at=created)
    deny(SYSTEM, E.ERASE_PERSONAL, tentative, "privacy.tentative_expiry", created + timedelta(days=365, seconds=-1),
         mentions="unless it is confirmed")
    allow(SYSTEM, E.ERASE_PERSONAL, tentative, "privacy.tentative_expiry", created + timedelta(days=365))
    deny(SYSTEM, E.ERASE_PERSONAL, replace(tentative, anonymised_at=NOW), "privacy.tentative_expiry",
         created + timedelta(days=400), mentions="already")


def test_closed_and_deactivated_accounts_are_anonymised_after_a_year():
    closed = account(state="closed", closed_at=NOW)
    deny(SYSTEM, E.ERASE_PERSONAL, closed, "privacy.closed_anonymised", NOW + timedelta(days=364),
         mentions="kept until 2027-03-15")
    allow(SYSTEM, E.ERASE_PERSONAL, closed, "privacy.closed_anonymised", NOW + timedelta(days=365),
          mentions="role history")
    deactivated = account(state="deactivated", deactivated_at=NOW)
    deny(SYSTEM, E.ERASE_PERSONAL, deactivated, "privacy.closed_anonymised", NOW + timedelta(days=10))
    allow(SYSTEM, E.ERASE_PERSONAL, deactivated, "privacy.closed_anonymised", NOW + timedelta(days=366))
    deny(SYSTEM, E.ERASE_PERSONAL, account(), "privacy.closed_anonymised", mentions="in use")
    # the data subject asks (or an admin carries the request out); nobody else may
    allow(COLLEAGUE, E.ERASE_PERSONAL, account(), "privacy.data_subject_rights")
    allow(ADMIN, E.ERASE_PERSONAL, account(), "admin.access_rights")
    deny(PI, E.ERASE_PERSONAL, account(), "user.own_data")


def test_a_closed_account_loses_its_active_roles_at_once():
    allow(SYSTEM, E.REMOVE_ROLES, account(state="closed", closed_at=NOW, active_roles=2),
          "privacy.closed_roles_removed", mentions="history is kept")
    deny(SYSTEM, E.REMOVE_ROLES, account(state="closed", closed_at=NOW), "privacy.closed_roles_removed")
    deny(SYSTEM, E.REMOVE_ROLES, account(active_roles=2), "privacy.closed_roles_removed", mentions="not closed")
    deny(ADMIN, E.REMOVE_ROLES, account(state="closed", active_roles=2), "default.deny")


def test_accounts_of_minors_are_deactivated_and_their_data_removed():
    minor = account(under_18=True, active_roles=1)
    allow(SYSTEM, E.DEACTIVATE, minor, "privacy.minors")
    allow(SYSTEM, E.REMOVE_ROLES, minor, "privacy.minors")
    allow(SYSTEM, E.ERASE_PERSONAL, minor, "privacy.minors")
    deny(SYSTEM, E.DEACTIVATE, replace(minor, state="deactivated"), "privacy.minors", mentions="already")
    deny(SYSTEM, E.REMOVE_ROLES, replace(minor, active_roles=0), "privacy.minors")
    deny(SYSTEM, E.ERASE_PERSONAL, replace(minor, anonymised_at=NOW), "privacy.minors")
    deny(SYSTEM, E.DEACTIVATE, account(), "privacy.minors", mentions="not flagged")
    deny(ADMIN, E.DEACTIVATE, minor, "default.deny")


# ------------------------------------------------------------------------------------------
# mirrors and the service's own use of data
# ------------------------------------------------------------------------------------------
def test_mirrors_only_where_the_pi_agreed():
    deny(SYSTEM, E.MIRROR, PROP, "mirror.pi_agreed", mentions=EXID)
    allow(SYSTEM, E.MIRROR, replace(PROP, mirror_agreed=True), "mirror.pi_agreed")


def test_proprietary_data_is_not_used_to_improve_the_service():
    deny(SYSTEM, E.SERVICE_USE, PROP, "proprietary.no_service_use")
    deny(SYSTEM, E.SERVICE_USE, replace(PROP, public=True), "proprietary.no_service_use")
    allow(SYSTEM, E.SERVICE_USE, PUBLIC, "public.open_experiment")
    deny(SYSTEM, E.SERVICE_USE, OPEN, "default.deny")


# ------------------------------------------------------------------------------------------
# departments, projects, admins
# ------------------------------------------------------------------------------------------
def test_department_membership_reads_non_proprietary_data():
    allow(COLLEAGUE, E.READ, OPEN, "department.member_read_modify", mentions=EXID)
    allow(user(STRANGER_ID, dept=DEPT_B, read=(DEPT_A,)), E.READ, OPEN, "department.member_read_modify")
    deny(STRANGER, E.READ, OPEN, "default.deny", mentions=EXID)
    deny(STRANGER, E.READ, File(OPEN, "raw/a.h5"), "default.deny")


def test_project_access_is_read_only_and_crosses_departments():
    linked = replace(OPEN, project_ids=frozenset({PROJ_1}))
    reader = user(STRANGER_ID, dept=DEPT_B, projects=frozenset({PROJ_1}))
    allow(reader, E.READ, linked, "project.read_only", mentions=EXID)
    allow(reader, E.READ, File(linked, "raw/a.h5"), "derived.parent")
    deny(reader, E.MODIFY, linked, "project.read_only", mentions="read-only")
    deny(reader, E.UPLOAD, File(linked, "raw/a.h5"), "project.read_only")
    deny(user(STRANGER_ID, dept=DEPT_B, projects=frozenset({PROJ_2})), E.READ, linked, "default.deny")
    deny(reader, E.READ, replace(PROP, project_ids=frozenset({PROJ_1})), "proprietary.assigned_only")


def test_admins_manage_access_rights():
    change = DepartmentAccessChange(Department(DEPT_B), COLLEAGUE, modify=True)
    allow(ADMIN, E.MANAGE_ACCESS, change, "admin.access_rights")
    deny(COLLEAGUE, E.MANAGE_ACCESS, change, "admin.access_rights", mentions="admins")
    deny(PI, E.MANAGE_ACCESS, change, "admin.access_rights")
    deny(ANONYMOUS, E.MANAGE_ACCESS, change, "account.state")


def test_project_access_is_managed_by_admins_and_the_project_pi():
    project = Project(PROJ_1, pi_id=PI_ID, institution_id=INST_A)
    allow(ADMIN, E.MANAGE_ACCESS, ProjectAccessChange(project, STRANGER), "admin.access_rights")
    allow(PI, E.MANAGE_ACCESS, ProjectAccessChange(project, OUTSIDER), "admin.access_rights")
    deny(COLLEAGUE, E.MANAGE_ACCESS, ProjectAccessChange(project, STRANGER), "admin.access_rights")
    deny(ADMIN, E.MANAGE_ACCESS, ProjectAccessChange(project, OUTSIDER),
         "sharing.cross_institution_pi_confirm")
    deny(ADMIN, E.MANAGE_ACCESS, ProjectAccessChange(project, replace(STRANGER, state="tentative")),
         "account.state")


# ------------------------------------------------------------------------------------------
# user-owned data: accounts, access logs, personal repositories
# ------------------------------------------------------------------------------------------
def test_accounts_are_their_owners():
    own = Account(COLLEAGUE_ID)
    for action in (E.READ, E.EXPORT, E.CORRECT, E.CLOSE):
        allow(COLLEAGUE, action, own, "privacy.data_subject_rights")
        deny(STRANGER, action, own, "user.own_data")
        deny(ANONYMOUS, action, own, "user.own_data")
        allow(ADMIN, action, own, "admin.access_rights")
    # a closed account's owner still exercises their rights (export, access)
    allow(replace(COLLEAGUE, state="closed"), E.EXPORT, own, "privacy.data_subject_rights")


def test_own_access_log():
    allow(COLLEAGUE, E.READ_AUDIT, Account(COLLEAGUE_ID), "privacy.own_access_log")
    deny(STRANGER, E.READ_AUDIT, Account(COLLEAGUE_ID), "privacy.own_access_log")
    allow(ADMIN, E.READ_AUDIT, Account(COLLEAGUE_ID), "audit.full_trail")


def test_role_history_is_kept():
    for who in (COLLEAGUE, ADMIN, replace(COLLEAGUE, state="closed"), SYSTEM):
        deny(who, E.DELETE_HISTORY, Account(COLLEAGUE_ID), "privacy.role_history_kept")


def test_experiment_metadata_is_exempt_from_erasure_but_correctable():
    for who in (PI, COLLEAGUE, ADMIN):
        deny(who, E.ERASE_METADATA, PROP, "privacy.metadata_exempt")
    allow(PI, E.CORRECT, PROP, "privacy.metadata_exempt", mentions="correct")
    deny(MANAGER, E.CORRECT, PROP, "retention.pi_only")


def test_personal_repository_is_owner_only():
    item = PersonalItem(COLLEAGUE_ID, "notes/draft.ipynb")
    for action in (E.READ, E.MODIFY, E.SHARE, E.DELETE):
        allow(COLLEAGUE, action, item, "privacy.personal_repository")
        deny(STRANGER, action, item, "user.own_data")
        deny(ADMIN, action, item, "user.own_data")
        deny(ANONYMOUS, action, item, "account.state")


def test_shared_personal_files_are_readable_by_the_named_users():
    item = PersonalItem(COLLEAGUE_ID, "figures/", shared_with=frozenset({OUTSIDER_ID}))
    allow(OUTSIDER, E.READ, item, "privacy.personal_repository", mentions="shared")
    deny(OUTSIDER, E.MODIFY, item, "user.own_data")
    deny(OUTSIDER, E.SHARE, item, "user.own_data")
    deny(STRANGER, E.READ, item, "user.own_data")
    deny(replace(OUTSIDER, state="closed"), E.READ, item, "account.state")


# ------------------------------------------------------------------------------------------
# derived entities: files, steps, results, comments
# ------------------------------------------------------------------------------------------
def test_files_and_steps_derive_access_from_their_experiment():
    allow(VIEWER, E.READ, File(PROP, "raw/scan_0001.h5"), "derived.parent", mentions=EXID)
    allow(VIEWER, E.READ, File(PROP, "integrate", kind="step"), "derived.parent", mentions="step")
    deny(COLLEAGUE, E.READ, File(PROP, "raw/scan_0001.h5"), "proprietary.assigned_only")


def test_results_and_comments_derive_access_from_their_parent():
    rs = ResultSet(7, OPEN, DEPT_A)  # unpublished
    allow(COLLEAGUE, E.READ, Result(rs), "derived.parent", mentions="result")
    deny(STRANGER, E.READ, Result(rs), "result_set.published_visibility")
    allow(VIEWER, E.READ, Result(PROP, "comment"), "derived.parent", mentions="comment")
    deny(COLLEAGUE, E.READ, Result(PROP, "comment"), "proprietary.assigned_only")
    allow(COLLEAGUE, E.READ, Result(rs, "comment"), "derived.parent", mentions="comment")


# ------------------------------------------------------------------------------------------
# result sets: the department sees them all; outside only once published
# ------------------------------------------------------------------------------------------
def test_result_sets_are_visible_outside_the_department_only_once_published():
    draft = ResultSet(7, OPEN, DEPT_A)
    published = replace(draft, published=True)
    allow(COLLEAGUE, E.READ, draft, "department.unpublished_result_sets")
    deny(STRANGER, E.READ, draft, "result_set.published_visibility", mentions="not published")
    # outside the department, published, and the experiment is readable (here: by project)
    reader = user(STRANGER_ID, dept=DEPT_B, projects=frozenset({PROJ_1}))
    linked = replace(OPEN, project_ids=frozenset({PROJ_1}))
    deny(reader, E.READ, replace(draft, experiment=linked), "result_set.published_visibility")
    allow(reader, E.READ, replace(published, experiment=linked), "result_set.published_visibility",
          mentions=EXID)
    # the result set's own project link opens it once published
    allow(reader, E.READ, replace(published, project_ids=frozenset({PROJ_1})), "project.read_only")
    deny(STRANGER, E.READ, published, "default.deny")
    # public experiments: visitors see published result sets only
    allow(ANONYMOUS, E.READ, replace(published, experiment=PUBLIC), "result_set.published_visibility")
    deny(ANONYMOUS, E.READ, replace(draft, experiment=PUBLIC), "result_set.published_visibility")
    deny(ANONYMOUS, E.READ, published, "result_set.published_visibility")


def test_result_sets_of_proprietary_experiments():
    rs = ResultSet(7, PROP, DEPT_A, published=True)
    deny(COLLEAGUE, E.READ, rs, "proprietary.assigned_only")  # the department alone does not open it
    allow(VIEWER, E.READ, rs, "department.unpublished_result_sets")
    allow(with_role(OUTSIDER_ID, "viewer", inst=INST_B, dept=DEPT_C), E.READ, rs,
          "result_set.published_visibility")
    deny(with_role(OUTSIDER_ID, "viewer", inst=INST_B, dept=DEPT_C), E.READ,
         replace(rs, published=False), "result_set.published_visibility")
    allow(PI, E.READ, replace(rs, department_id=DEPT_C), "proprietary.pi_owner")
    allow(WRITER, E.READ, replace(rs, department_id=DEPT_C, published=False, created_by=WRITER_ID),
          "ownership.upload_results", mentions="uploaded")
    deny(replace(VIEWER, state="deactivated"), E.READ, rs, "account.state")


def test_publishing_result_sets():
    draft = ResultSet(7, OPEN, DEPT_A)
    allow(COLLEAGUE, E.PUBLISH, draft, "result_set.published_visibility")
    allow(PI, E.PUBLISH, replace(draft, department_id=DEPT_C), "result_set.published_visibility")
    reader = user(STRANGER_ID, dept=DEPT_B, read=(DEPT_A,))
    deny(reader, E.PUBLISH, draft, "result_set.published_visibility", mentions="modify rights")
    deny(STRANGER, E.PUBLISH, draft, "result_set.published_visibility")


def test_lists_hide_what_cannot_be_read():
    allow(VIEWER, E.LIST, PROP, "role.grant")
    deny(COLLEAGUE, E.LIST, PROP, "list.hide_inaccessible", mentions="only users the PI assigned")
    deny(STRANGER, E.LIST, OPEN, "list.hide_inaccessible", mentions=EXID)
    deny(FACILITY, E.LIST, PROP, "list.hide_inaccessible", after_end(31), mentions="2026-03-31")
    draft = ResultSet(7, OPEN, DEPT_A)
    allow(COLLEAGUE, E.LIST, draft, "department.unpublished_result_sets")
    deny(STRANGER, E.LIST, draft, "list.hide_inaccessible", mentions="not published")


# ------------------------------------------------------------------------------------------
# existence stubs: non-proprietary primary entities only
# ------------------------------------------------------------------------------------------
def test_existence_stubs():
    allow(STRANGER, E.STUB, OPEN, "stub.existence", mentions=EXID)
    allow(OUTSIDER, E.STUB, OPEN, "stub.existence")
    deny(ANONYMOUS, E.STUB, OPEN, "account.state")
    deny(COLLEAGUE, E.STUB, PROP, "stub.existence", mentions="proprietary")
    deny(OUTSIDER, E.STUB, PROP, "stub.existence")
    allow(VIEWER, E.STUB, PROP, "role.grant")  # who may read sees more than a stub
    # result sets are primary entities, results are not
    draft = ResultSet(7, OPEN, DEPT_A)
    allow(STRANGER, E.STUB, draft, "stub.existence")
    deny(COLLEAGUE, E.STUB, ResultSet(7, PROP, DEPT_A), "stub.existence")
    deny(replace(STRANGER, state="tentative"), E.STUB, draft, "account.state")
    deny(STRANGER, E.STUB, Result(draft), "stub.existence", mentions="result")
    deny(COLLEAGUE, E.STUB, Result(draft), "stub.existence")
    allow(STRANGER, E.STUB, Project(PROJ_1, pi_id=PI_ID), "stub.existence")
    deny(ANONYMOUS, E.STUB, Project(PROJ_1, pi_id=PI_ID), "account.state")


# ------------------------------------------------------------------------------------------
# ownership of new entities
# ------------------------------------------------------------------------------------------
def test_new_entities_belong_to_your_department_unless_you_write_the_other():
    allow(COLLEAGUE, E.ASSIGN_OWNER, Department(DEPT_A), "ownership.default_department")
    deny(COLLEAGUE, E.ASSIGN_OWNER, Department(DEPT_B), "ownership.default_department")
    deny(user(COLLEAGUE_ID, read=(DEPT_B,)), E.ASSIGN_OWNER, Department(DEPT_B),
         "ownership.default_department")
    allow(user(COLLEAGUE_ID, modify=(DEPT_B,)), E.ASSIGN_OWNER, Department(DEPT_B),
          "ownership.default_department")
    deny(ANONYMOUS, E.ASSIGN_OWNER, Department(DEPT_A), "account.state")


def test_creating_experiments():
    allow(PI, E.CREATE, NewExperiment(PI), "experiment.create")
    allow(ADMIN, E.CREATE, NewExperiment(PI, department_id=DEPT_C), "experiment.create")
    allow(FACILITY, E.CREATE, NewExperiment(PI), "experiment.create")
    deny(COLLEAGUE, E.CREATE, NewExperiment(PI), "experiment.create")
    # another department needs write access there
    deny(PI, E.CREATE, NewExperiment(PI, department_id=DEPT_B), "ownership.default_department")
    pi_b = user(PI_ID, modify=(DEPT_B,))
    allow(pi_b, E.CREATE, NewExperiment(pi_b, department_id=DEPT_B), "experiment.create")
    allow(PI, E.CREATE, NewExperiment(PI, department_id=DEPT_A), "experiment.create")
    deny(ANONYMOUS, E.CREATE, NewExperiment(PI), "account.state")
    deny(ADMIN, E.CREATE, NewExperiment(replace(PI, state="tentative")), "account.state")


def test_a_pi_needs_a_verified_institution_and_institutional_email():
    no_mail = replace(PI, institutional_email_verified=False)
    no_inst = replace(PI, institution_verified=False)
    for pi in (no_mail, no_inst):
        deny(pi, E.CREATE, NewExperiment(pi), "pi.verified_institution", mentions="verified")
        deny(ADMIN, E.CREATE, NewExperiment(pi), "pi.verified_institution")
    allow(ADMIN, E.CREATE, NewExperiment(PI), "experiment.create")


def test_uploading_results_needs_department_write_and_project_access():
    two = replace(OPEN, project_ids=frozenset({PROJ_1, PROJ_2}))
    one_project = user(COLLEAGUE_ID, projects=frozenset({PROJ_1}))
    both_projects = user(COLLEAGUE_ID, projects=frozenset({PROJ_1, PROJ_2}))
    allow(COLLEAGUE, E.UPLOAD_RESULTS, NewResultSet(OPEN), "ownership.upload_results")
    deny(COLLEAGUE, E.UPLOAD_RESULTS, NewResultSet(two), "ownership.upload_results",
         mentions=("project", "100", "101"))
    deny(one_project, E.UPLOAD_RESULTS, NewResultSet(two), "ownership.upload_results", mentions="101")
    allow(both_projects, E.UPLOAD_RESULTS, NewResultSet(two), "ownership.upload_results")
    # read-only department membership is not write access
    reader = user(STRANGER_ID, dept=DEPT_B, read=(DEPT_A,), projects=frozenset({PROJ_1, PROJ_2}))
    deny(reader, E.UPLOAD_RESULTS, NewResultSet(two), "ownership.upload_results",
         mentions="write access")
    # proprietary experiments: the writer role is the write access
    allow(WRITER, E.UPLOAD_RESULTS, NewResultSet(PROP), "ownership.upload_results")
    deny(VIEWER, E.UPLOAD_RESULTS, NewResultSet(PROP), "ownership.upload_results", mentions="writer")
    deny(COLLEAGUE, E.UPLOAD_RESULTS, NewResultSet(PROP), "proprietary.assigned_only")
    allow(PI, E.UPLOAD_RESULTS, NewResultSet(replace(PROP, project_ids=frozenset({PROJ_1}))),
          "ownership.upload_results")
    # placing the result set in another department needs write access there
    deny(COLLEAGUE, E.UPLOAD_RESULTS, NewResultSet(OPEN, department_id=DEPT_B),
         "ownership.default_department")
    allow(user(COLLEAGUE_ID, modify=(DEPT_B,)), E.UPLOAD_RESULTS, NewResultSet(OPEN, department_id=DEPT_B),
          "ownership.upload_results")


def test_results_need_every_project_is_a_trait():
    two = replace(OPEN, project_ids=frozenset({PROJ_1, PROJ_2}))
    one_project = user(COLLEAGUE_ID, projects=frozenset({PROJ_1}))
    any_one = Policy(results_need_every_project=False)
    allow(one_project, E.UPLOAD_RESULTS, NewResultSet(two), "ownership.upload_results", policy=any_one)
    deny(COLLEAGUE, E.UPLOAD_RESULTS, NewResultSet(two), "ownership.upload_results", policy=any_one)
    deny(one_project, E.UPLOAD_RESULTS, NewResultSet(two), "ownership.upload_results",
         policy=Policy(results_need_every_project=True))


# ------------------------------------------------------------------------------------------
# people: name + institution to registered users, e-mail private, public members
# ------------------------------------------------------------------------------------------
def test_people_are_shown_by_name_and_institution():
    other = Person(OUTSIDER_ID, INST_B)
    allow(COLLEAGUE, E.VIEW_PERSON, other, "privacy.identity", mentions="name and institution")
    allow(COLLEAGUE, E.VIEW_PERSON, replace(other, shares_context=True), "privacy.members_visible")
    allow(OUTSIDER, E.VIEW_PERSON, other, "privacy.data_subject_rights")
    deny(ANONYMOUS, E.VIEW_PERSON, other, "privacy.members_visible")
    allow(ANONYMOUS, E.VIEW_PERSON, replace(other, public_member=True), "privacy.members_visible",
          mentions="public experiment")
    deny(replace(COLLEAGUE, state="tentative"), E.VIEW_PERSON, other, "account.state")


def test_email_addresses_are_private_unless_allowed():
    other = Person(OUTSIDER_ID, INST_B)
    deny(COLLEAGUE, E.VIEW_EMAIL, other, "privacy.email_private")
    deny(COLLEAGUE, E.VIEW_EMAIL, replace(other, shares_context=True), "privacy.email_private")
    deny(ANONYMOUS, E.VIEW_EMAIL, replace(other, email_visible=True, public_member=True),
         "privacy.email_private")
    allow(COLLEAGUE, E.VIEW_EMAIL, replace(other, email_visible=True), "privacy.email_private",
          mentions="allowed")
    allow(OUTSIDER, E.VIEW_EMAIL, other, "privacy.email_private", mentions="your own")
    allow(ADMIN, E.VIEW_EMAIL, other, "privacy.email_private")


# ------------------------------------------------------------------------------------------
# activity log for participants; full audit trail for the PI and admins
# ------------------------------------------------------------------------------------------
def test_activity_log_for_participants():
    allow(VIEWER, E.READ_ACTIVITY, PROP, "privacy.activity_log", mentions=EXID)
    allow(PI, E.READ_ACTIVITY, PROP, "privacy.activity_log")
    allow(FACILITY, E.READ_ACTIVITY, PROP, "privacy.activity_log", after_end(1))
    deny(FACILITY, E.READ_ACTIVITY, PROP, "facility.access_window", after_end(31))
    allow(COLLEAGUE, E.READ_ACTIVITY, OPEN, "privacy.activity_log")
    deny(COLLEAGUE, E.READ_ACTIVITY, PROP, "proprietary.assigned_only")
    # readers who are not participants: visitors of a public experiment
    deny(OUTSIDER, E.READ_ACTIVITY, PUBLIC, "privacy.activity_log", mentions="not a participant")
    deny(ANONYMOUS, E.READ_ACTIVITY, PUBLIC, "privacy.activity_log")


def test_full_audit_trail_for_pi_and_admins():
    allow(PI, E.READ_AUDIT, PROP, "audit.full_trail", mentions=EXID)
    allow(ADMIN, E.READ_AUDIT, PROP, "audit.full_trail")
    for other in (MANAGER, WRITER, VIEWER, COLLEAGUE):
        deny(other, E.READ_AUDIT, PROP, "audit.full_trail", mentions="PI and admins")
    deny(ANONYMOUS, E.READ_AUDIT, PUBLIC, "account.state")


# ------------------------------------------------------------------------------------------
# environments: licences; proprietary environments stay inside their institution
# ------------------------------------------------------------------------------------------
def test_environments_need_valid_licences():
    env = Environment(1, "xds-matlab", licences=frozenset({"matlab", "xds"}))
    valid = NOW + timedelta(days=90)
    licensed = replace(COLLEAGUE, licences={"matlab": valid, "xds": None})
    allow(licensed, E.USE, env, "environment.licensed", mentions="xds-matlab")
    deny(replace(COLLEAGUE, licences={"matlab": valid}), E.USE, env, "environment.licensed",
         mentions="xds")
    deny(COLLEAGUE, E.USE, env, "environment.licensed", mentions=("matlab", "xds"))
    expired = replace(COLLEAGUE, licences={"matlab": NOW - timedelta(days=1), "xds": None})
    deny(expired, E.USE, env, "environment.licensed", mentions="matlab (expired 2026-03-14)")
    allow(expired, E.USE, env, "environment.licensed", NOW - timedelta(days=2))
    allow(COLLEAGUE, E.USE, Environment(2, "python"), "environment.licensed")
    deny(ANONYMOUS, E.USE, Environment(2, "python"), "account.state")


def test_proprietary_environments_stay_in_their_institution():
    env = Environment(3, "inhouse-pipeline", proprietary=True, institution_id=INST_A)
    allow(COLLEAGUE, E.USE, env, "environment.proprietary_institution_only", mentions="inhouse-pipeline")
    deny(OUTSIDER, E.USE, env, "environment.proprietary_institution_only", mentions="another institution")
    deny(VENDOR_ADMIN, E.USE, env, "environment.proprietary_institution_only")
    licensed_env = replace(env, licences=frozenset({"matlab"}))
    deny(COLLEAGUE, E.USE, licensed_env, "environment.licensed")
    # an environment marked proprietary without an owner is nobody's (engine fix)
    nobody = user(STRANGER_ID, inst=None)
    deny(nobody, E.USE, replace(env, institution_id=None), "environment.proprietary_institution_only")


def test_proprietary_environments_are_never_public():
    env = Environment(3, "inhouse-pipeline", proprietary=True, institution_id=INST_A)
    for who in (ADMIN, COLLEAGUE, SYSTEM):
        deny(who, E.PUBLISH, env, "environment.proprietary_institution_only", mentions="never public")
    allow(ADMIN, E.PUBLISH, Environment(2, "python"), "environment.proprietary_institution_only")
    deny(COLLEAGUE, E.PUBLISH, Environment(2, "python"), "admin.access_rights")


# ------------------------------------------------------------------------------------------
# accounts: sign-up and sign-in
# ------------------------------------------------------------------------------------------
def test_registration_needs_an_adult_a_verified_institution_and_its_domain():
    ok = Registration(INST_A, "Uni A", institution_verified=True, email_at_institution=True, adult=True)
    allow(ANONYMOUS, E.REGISTER, ok, "account.registration", mentions="tentatively")
    deny(ANONYMOUS, E.REGISTER, replace(ok, adult=False), "account.adult", mentions="18")
    deny(ANONYMOUS, E.REGISTER, replace(ok, institution_id=None), "account.registration")
    deny(ANONYMOUS, E.REGISTER, replace(ok, institution_verified=False), "account.registration",
         mentions="Uni A")
    # a typed address outside the institution's verified domains proves nothing
    deny(ANONYMOUS, E.REGISTER, replace(ok, email_at_institution=False), "account.registration",
         mentions="domains")


def test_password_sign_in_lockout_then_password_then_state():
    ok = SignIn("password", password_ok=True)
    allow(COLLEAGUE, E.SIGN_IN, ok, "signin.credentials")
    deny(COLLEAGUE, E.SIGN_IN, replace(ok, password_ok=False), "signin.credentials",
         mentions="wrong")
    locked = replace(ok, locked_until=NOW + timedelta(minutes=5))
    # locked: refused even with the right password, and before the password is looked at
    deny(COLLEAGUE, E.SIGN_IN, locked, "signin.lockout", mentions="locked until")
    deny(COLLEAGUE, E.SIGN_IN, replace(locked, password_ok=False), "signin.lockout")
    allow(COLLEAGUE, E.SIGN_IN, replace(ok, locked_until=NOW - timedelta(seconds=1)),
          "signin.credentials")
    # a wrong password says nothing about the account's state
    deny(replace(COLLEAGUE, state="closed"), E.SIGN_IN, replace(ok, password_ok=False),
         "signin.credentials")
    for state, says in (("tentative", "link"), ("deactivated", "deactivated"), ("closed", "closed")):
        deny(replace(COLLEAGUE, state=state), E.SIGN_IN, ok, "account.state", mentions=says)
    deny(replace(COLLEAGUE, institution_verified=False), E.SIGN_IN, ok, "signin.institution")
    deny(replace(COLLEAGUE, institution_id=None), E.SIGN_IN, ok, "signin.institution")
    deny(ANONYMOUS, E.SIGN_IN, ok, "default.deny")
    deny(COLLEAGUE, E.SIGN_IN, replace(ok, method="telepathy"), "default.deny")


def test_second_factor_for_pis_admins_and_the_enrolled():
    pw = SignIn("password", password_ok=True, is_pi=True)
    deny(PI, E.SIGN_IN, pw, "signin.second_factor", mentions="set up")
    enrolled = replace(pw, totp_enrolled=True)
    deny(PI, E.SIGN_IN, enrolled, "signin.second_factor", mentions="code")
    deny(PI, E.SIGN_IN, replace(enrolled, totp_ok=False), "signin.second_factor", mentions="wrong")
    allow(PI, E.SIGN_IN, replace(enrolled, totp_ok=True), "signin.second_factor")
    # who enrolled voluntarily is asked for the code as well
    deny(COLLEAGUE, E.SIGN_IN, SignIn("password", password_ok=True, totp_enrolled=True),
         "signin.second_factor")
    # the traits: PIs without, admins with a second factor
    relaxed = Policy(config=Config({"Policy": {"totp_required_for_pis": False,
                                               "totp_required_for_admins": True}}))
    check(PI, E.SIGN_IN, pw, allowed=True, rule="signin.credentials", policy=relaxed)
    check(ADMIN, E.SIGN_IN, SignIn("password", password_ok=True), allowed=False,
          rule="signin.second_factor", policy=relaxed)
    allow(ADMIN, E.SIGN_IN, SignIn("password", password_ok=True), "signin.credentials")
    assert (Policy().signin_lockout_attempts, Policy().signin_lockout_minutes) == (5, 15)


def test_identity_provider_sign_in_needs_the_claim_of_an_allowed_idp():
    ok = SignIn("idp", idp="https://idp.uni-a.example", claim="uni-a.example",
                claim_institution_id=INST_A, idp_allowed=True)
    allow(COLLEAGUE, E.SIGN_IN, ok, "signin.institution", mentions="uni-a.example")
    # CVE-2022-31027: without the claim nothing (e.g. a matching e-mail domain) proves membership
    deny(COLLEAGUE, E.SIGN_IN, replace(ok, claim=None), "signin.institution", mentions="did not state")
    deny(COLLEAGUE, E.SIGN_IN, replace(ok, claim_institution_id=None), "signin.institution")
    deny(COLLEAGUE, E.SIGN_IN, replace(ok, idp_allowed=False), "signin.institution",
         mentions="not registered")
    deny(COLLEAGUE, E.SIGN_IN, replace(ok, claim_institution_id=INST_B), "signin.institution",
         mentions="another institution")
    deny(replace(COLLEAGUE, institution_verified=False), E.SIGN_IN, ok, "signin.institution")
    deny(replace(COLLEAGUE, state="deactivated"), E.SIGN_IN, ok, "account.state")
    # the identity provider's own second factor is its business: no TOTP here
    allow(PI, E.SIGN_IN, replace(ok, is_pi=True), "signin.institution")


def test_session_re_check_follows_state_and_institution():
    allow(COLLEAGUE, E.SIGN_IN, SignIn("session"), "signin.institution")
    deny(replace(COLLEAGUE, state="closed"), E.SIGN_IN, SignIn("session"), "account.state")
    deny(replace(COLLEAGUE, institution_id=None), E.SIGN_IN, SignIn("session"), "signin.institution")


# ------------------------------------------------------------------------------------------
# default deny, actions, rule catalogue
# ------------------------------------------------------------------------------------------
def test_nothing_is_allowed_by_default():
    deny(PI, "frobnicate", PROP, "default.deny", mentions="frobnicate")
    deny(ADMIN, E.PUBLISH, Account(ADMIN_ID), "default.deny", mentions="Account")
    deny(ADMIN, E.READ, object(), "default.deny")
    deny(PI, E.MODIFY, Project(PROJ_1, pi_id=PI_ID), "default.deny")
    deny(SYSTEM, E.READ, OPEN, "account.state")


def test_action_constants():
    names = {"read", "list", "stub", "modify", "upload", "upload_results", "publish", "unpublish",
             "grant_role", "revoke_role", "share", "confirm_share", "extend_retention", "archive",
             "delete", "expire", "mirror", "agree_mirror", "create", "assign_owner",
             "read_activity_log", "read_audit_trail", "view_person", "view_email", "use",
             "service_use", "manage_access", "export", "correct", "close",
             "delete_role_history", "erase_metadata", "request", "register", "sign_in"}
    names |= {"notify", "erase_personal_data", "remove_roles", "deactivate"}  # the lifecycle job's
    assert names == set(ACTIONS)


def test_every_rule_names_a_policy_sentence():
    for name, rule in RULES.items():
        assert rule.name == name
        assert rule.source and rule.text.strip()
    assert set(ALLOW_ONLY) <= set(RULES) and set(DENY_ONLY) <= set(RULES)
    assert not set(ALLOW_ONLY) & set(DENY_ONLY)


# ------------------------------------------------------------------------------------------
# IP truncation for access logs
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ip", "expected"), [
    ("192.168.17.4", "192.168.x.x"),
    (" 10.1.2.3 ", "10.1.x.x"),
    ("2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd::/48"),
    ("2001:0db8:abcd:ffff::1", "2001:db8:abcd::/48"),
    ("fe80::1%eth0", "fe80::/48"),
    ("::ffff:192.168.17.4", "192.168.x.x"),
    ("::1", "::/48"),
    ("not-an-ip", "-"),
    ("999.1.1.1", "-"),
    ("192.168.1.1; DROP TABLE", "-"),
    ("", "-"),
    (None, "-"),
])
def test_truncate_ip(ip, expected):
    assert truncate_ip(ip) == expected


def test_truncate_ip_follows_the_policy_traits():
    assert truncate_ip("192.168.17.4", 1) == "192.168.17.x"
    assert truncate_ip("192.168.17.4", 0) == "192.168.17.4"
    assert truncate_ip("192.168.17.4", 4) == "x.x.x.x"
    assert truncate_ip("192.168.17.4", 9) == "x.x.x.x"
    assert truncate_ip("2001:db8:abcd:12::1", v6_prefix_bits=32) == "2001:db8::/32"
    assert truncate_ip("2001:db8:abcd:12::1", v6_prefix_bits=64) == "2001:db8:abcd:12::/64"
    policy = Policy(ipv4_masked_bytes=3, ipv6_prefix_bits=32)
    assert policy.ipv4_masked_bytes == 3
    assert truncate_ip("192.168.17.4", policy.ipv4_masked_bytes, policy.ipv6_prefix_bits) == "192.x.x.x"
    assert truncate_ip("2001:db8:abcd::1", policy.ipv4_masked_bytes, policy.ipv6_prefix_bits) == "2001:db8::/32"
    defaults = Policy()
    assert truncate_ip("192.168.17.4", defaults.ipv4_masked_bytes, defaults.ipv6_prefix_bits) == "192.168.x.x"


def test_result_sets_of_a_deleted_experiment_are_gone():
    """Regression: derived data must not outlive its experiment's deletion."""
    from datetime import datetime, timezone

    from labvault import policies as p

    now = datetime(2026, 6, 1, tzinfo=timezone.utc)
    e = p.Experiment(id=1, exid="E-DEL", pi_id=1, department_id=5, proprietary=False,
                     deleted_at=datetime(2026, 5, 1, tzinfo=timezone.utc))
    rs = p.ResultSet(id=9, experiment=e, department_id=5, published=True)
    member = p.Subject(user_id=2, department_id=5, read_departments=frozenset({5}), modify_departments=frozenset({5}))
    check(member, "read", rs, now, allowed=False, rule="retention.deleted", mentions="2026-05-01")
    check(member, "read", p.Result(rs), now, allowed=False, rule="retention.deleted")



def test_request_rate():
    """abuse.rate_limit: the service's token bucket says whether the rate was exceeded."""
    from labvault.policies import RequestRate

    check(ANON_OR_ANY, "request", RequestRate(False, 10.0), allowed=True, rule="abuse.rate_limit")
    check(ANON_OR_ANY, "request", RequestRate(True, 10.0), allowed=False, rule="abuse.rate_limit",
          mentions="too many requests")


ANON_OR_ANY = Subject(user_id=7)

# ------------------------------------------------------------------------------------------
# the meta-test: keep it LAST in this module (pytest runs tests in file order)
# ------------------------------------------------------------------------------------------
def test_zz_every_rule_covered(request):
    mine = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    everything = [name for name, obj in vars(request.module).items()
                  if name.startswith("test_") and callable(obj)]
    ran = {item.originalname or item.name for item in mine}
    if set(everything) - ran:
        pytest.skip("only part of this module was selected; coverage is checked on full runs")
    assert mine[-1] is request.node, "test_zz_every_rule_covered must run last"
    expected = set()
    for name in RULES:
        if name not in DENY_ONLY:
            expected.add((name, True))
        if name not in ALLOW_ONLY:
            expected.add((name, False))
    missing = sorted(expected - SEEN)
    unexpected = sorted(SEEN - expected)
    unknown = sorted({rule for rule, _ in SEEN} - set(RULES))
    assert not unknown, f"decisions named rules that are not in RULES: {unknown}"
    assert not missing, "rules never seen on this side (rule, allowed): " + ", ".join(map(str, missing))
    assert not unexpected, (
        "one-sided rules seen on their other side; fix ALLOW_ONLY / DENY_ONLY: "
        + ", ".join(map(str, unexpected))
    )

