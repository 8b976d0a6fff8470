"""Invariants of the policy engine over randomly generated worlds (hypothesis).

The worlds are small on purpose (two experiments, a handful of users, departments, projects and
institutions) so that random subjects collide with the experiments' PIs, departments, projects
and institutions often. Every datetime is timezone-aware UTC.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labvault.policies import (
    ACTIONS,
    ANONYMOUS,
    ROLES,
    RULES,
    SYSTEM,
    Account,
    Decision,
    Department,
    DepartmentAccessChange,
    Environment,
    Experiment,
    File,
    Grant,
    NewExperiment,
    NewResultSet,
    Person,
    PersonalItem,
    Policy,
    Project,
    ProjectAccessChange,
    Result,
    ResultSet,
    RetentionChange,
    RoleChange,
    Share,
    Subject,
    decide,
)
from labvault.policies import engine as E

UTC = timezone.utc
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
EXTRA = settings(SETTINGS, max_examples=100)  # the invariants beyond the seven asked for

USERS = st.integers(1, 6)
INSTITUTIONS = st.sampled_from([1, 2, 3, None])
DEPARTMENTS = st.sampled_from([10, 11, 12])


def subsets(values: tuple) -> st.SearchStrategy[frozenset]:
    """Any subset of ``values``, drawn as one bitmask (far cheaper than st.frozensets)."""
    return st.integers(0, 2 ** len(values) - 1).map(
        lambda m: frozenset(v for i, v in enumerate(values) if m >> i & 1))


DEPARTMENT_SET = subsets((10, 11, 12))
PROJECTS = subsets((100, 101, 102))
EXPERIMENT_IDS = st.sampled_from([1, 2])
STATES = ("tentative", "active", "deactivated", "closed")
INACTIVE = ("tentative", "deactivated", "closed")
BOOLS = st.booleans()
ANY_ROLE = st.sampled_from(ROLES)
ANY_STATE = st.sampled_from(STATES)

BASE = datetime(2024, 1, 1, tzinfo=UTC)
#: aware UTC datetimes 2024..2031 to the second (cheaper to generate than st.datetimes)
times = st.integers(0, 8 * 365 * 86400).map(lambda s: BASE + timedelta(seconds=s))
maybe_time = st.none() | times


@cache
def policy_for(days: int, minimum: int, every: bool) -> Policy:
    return Policy(facility_access_days=days, retention_minimum_days=minimum,
                  results_need_every_project=every)


@st.composite
def grants(draw, roles=ANY_ROLE) -> Grant:
    return Grant(draw(roles), expires_at=draw(maybe_time), revoked_at=draw(maybe_time))


@st.composite
def subjects(draw, *, vendor=BOOLS, states=ANY_STATE,
             grant=None, registered_only=False) -> Subject:
    if not registered_only and draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([ANONYMOUS, SYSTEM]))
    dept = draw(st.none() | DEPARTMENTS)
    read, modify = draw(DEPARTMENT_SET), draw(DEPARTMENT_SET)
    home = frozenset({dept}) if dept is not None else frozenset()
    flags = draw(st.integers(0, 15))  # institution verified, facility, admin, e-mail verified
    one_grant = grant if grant is not None else grants()
    held = {}
    for exp_id in draw(subsets((1, 2))):
        held[exp_id] = tuple(draw(one_grant) for _ in range(draw(st.integers(1, 3))))
    licences = {}
    for product in sorted(draw(subsets(("matlab", "xds", "dials")))):
        licences[product] = draw(maybe_time)
    return Subject(
        user_id=draw(USERS),
        name=draw(st.sampled_from(["", "Ada", "Bo"])),
        institution_id=draw(INSTITUTIONS),
        institution_verified=bool(flags & 1),
        is_vendor=draw(vendor),
        is_facility=bool(flags & 2),
        is_admin=bool(flags & 4),
        state=draw(states),
        institutional_email_verified=bool(flags & 8),
        department_id=dept,
        read_departments=home | read | modify,
        modify_departments=home | modify,
        projects=draw(PROJECTS),
        grants=held,
        licences=licences,
    )


@st.composite
def experiments(draw, *, proprietary=BOOLS, ended=False) -> Experiment:
    start = draw(maybe_time)
    end = draw(times if ended else maybe_time)
    archived = draw(maybe_time)
    return Experiment(
        id=draw(EXPERIMENT_IDS),
        exid=draw(st.sampled_from(["ESRF-2026-0001", "SLS-2025-0042", ""])),
        pi_id=draw(st.none() | USERS),
        institution_id=draw(INSTITUTIONS),
        department_id=draw(st.none() | DEPARTMENTS),
        project_ids=draw(PROJECTS),
        proprietary=draw(proprietary),
        public=draw(st.booleans()),
        start_at=start,
        end_at=end,
        status=draw(st.sampled_from(["active", "archived", "deleted"])),
        archived_at=archived,
        retain_until=draw(maybe_time),
        deleted_at=draw(maybe_time),
        mirror_agreed=draw(st.booleans()),
    )


@st.composite
def result_sets(draw, experiment) -> ResultSet:
    return ResultSet(
        id=draw(st.integers(1, 3)), experiment=experiment,
        department_id=draw(st.none() | DEPARTMENTS), project_ids=draw(PROJECTS),
        published=draw(st.booleans()), created_by=draw(st.none() | USERS),
    )


@st.composite
def projects(draw) -> Project:
    return Project(draw(st.sampled_from([100, 101, 102])), pi_id=draw(st.none() | USERS),
                   institution_id=draw(INSTITUTIONS))


@st.composite
def worlds(draw):
    """(subject, now, policy, every kind of resource built around one experiment)."""
    s = draw(subjects())
    e = draw(experiments())
    rs = draw(result_sets(e))
    other = draw(subjects())
    project = draw(projects())
    env = Environment(
        draw(st.integers(1, 3)), draw(st.sampled_from(["python", "xds-matlab", ""])),
        licences=draw(subsets(("matlab", "xds", "dials"))),
        proprietary=draw(st.booleans()), institution_id=draw(INSTITUTIONS), public=draw(st.booleans()),
    )
    resources = [
        e, File(e, "raw/a.h5"), File(e, "integrate", kind="step"), rs, Result(rs),
        Result(e, "comment"),
        RoleChange(e, other, draw(st.sampled_from([*ROLES, "owner"]))),
        Share(e, other, requested_by=draw(st.none() | USERS)),
        Share(None, other, project=project), Share(None, other),
        RetentionChange(e, draw(maybe_time)),
        NewExperiment(other, department_id=draw(st.none() | DEPARTMENTS), proprietary=draw(st.booleans())),
        NewResultSet(e, department_id=draw(st.none() | DEPARTMENTS)),
        Department(draw(DEPARTMENTS), institution_id=draw(INSTITUTIONS), virtual=draw(st.booleans())),
        DepartmentAccessChange(Department(draw(DEPARTMENTS)), other, modify=draw(st.booleans())),
        ProjectAccessChange(project, other), project,
        PersonalItem(draw(USERS), "notes/x.ipynb", shared_with=draw(subsets((1, 2, 3, 4, 5, 6)))),
        Person(draw(USERS), draw(INSTITUTIONS), state=draw(st.sampled_from(STATES)),
               email_visible=draw(st.booleans()), shares_context=draw(st.booleans()),
               public_member=draw(st.booleans())),
        env, Account(draw(USERS)), object(), None,
    ]
    policy = policy_for(draw(st.sampled_from([0, 1, 10, 30, 60])),
                        draw(st.sampled_from([0, 30, 365, 800])), draw(st.booleans()))
    return s, draw(times), policy, resources


def _data_views(e: Experiment, rs: ResultSet):
    """(action, resource) pairs that read or change an experiment's data."""
    f = File(e, "raw/a.h5")
    return [
        (E.READ, e), (E.LIST, e), (E.MODIFY, e), (E.UPLOAD, e),
        (E.READ, f), (E.MODIFY, f), (E.UPLOAD, f), (E.READ, File(e, "integrate", kind="step")),
        (E.READ, rs), (E.LIST, rs), (E.READ, Result(rs)), (E.READ, Result(e, "comment")),
        (E.UPLOAD_RESULTS, NewResultSet(e)),
    ]


def _well_formed(d: Decision) -> None:
    assert isinstance(d, Decision)
    assert isinstance(d.allowed, bool)
    assert d.rule in RULES, d
    assert isinstance(d.reason, str) and d.reason.strip(), d


# (1) ---------------------------------------------------------------------------------------
@SETTINGS
@given(s=subjects(vendor=st.just(True), registered_only=True),
       e=experiments(proprietary=st.just(True)), data=st.data(), now=times)
def test_vendor_never_reads_or_changes_proprietary_data(s, e, data, now):
    # give the vendor every advantage: the strongest grants and (sometimes) the admin flag
    s = data.draw(st.sampled_from([s, replace(s, grants={e.id: (Grant("manager"),)}),
                                   replace(s, is_admin=True, state="active")]))
    rs = data.draw(result_sets(e))
    for action, resource in _data_views(e, rs):
        d = decide(s, action, resource, now)
        assert not d.allowed, (action, resource, d)
    for role in ROLES:
        target = replace(s, state="active")
        pi = Subject(user_id=e.pi_id or 99, institution_id=e.institution_id, institution_verified=True)
        assert not decide(pi, E.GRANT_ROLE, RoleChange(e, target, role), now).allowed


# (2) ---------------------------------------------------------------------------------------
@SETTINGS
@given(s=subjects(), e=experiments(proprietary=st.just(True)), now=times)
def test_proprietary_experiments_are_never_published(s, e, now):
    d = decide(s, E.PUBLISH, e, now)
    assert not d.allowed and d.rule == "proprietary.never_public", d
    pi = Subject(user_id=e.pi_id or 1, state="active", is_admin=True)
    assert not decide(pi, E.PUBLISH, e, now).allowed


# (3) ---------------------------------------------------------------------------------------
#: mostly open grants, so that the window (not an expiry) is what is tested
open_facility_grants = st.builds(Grant, st.just("facility_staff"),
                                 st.none() | st.none() | times, st.none() | st.none() | times)
#: right at the boundary most of the time, anywhere later otherwise
lateness = st.sampled_from([timedelta(0), timedelta(microseconds=1), timedelta(seconds=1),
                            timedelta(days=1)]) | st.timedeltas(timedelta(0), timedelta(days=3000))


@SETTINGS
@given(s=subjects(grant=open_facility_grants, registered_only=True,
                  states=st.sampled_from(["active", "active", "active", *INACTIVE])),
       e=experiments(proprietary=st.just(True), ended=True),
       mine=st.lists(open_facility_grants, min_size=1, max_size=3),
       days=st.sampled_from([0, 1, 10, 30, 60]), late=lateness, own_policy=st.booleans())
def test_facility_staff_lose_proprietary_access_after_the_window(s, e, mine, days, late, own_policy):
    policy = policy_for(days, 365, True) if own_policy else None
    window = timedelta(days=days if own_policy else 30)
    if s.user_id == e.pi_id:
        s = replace(s, user_id=(e.pi_id % 6) + 1)
    s = replace(s, grants={**s.grants, e.id: tuple(mine)})
    now = e.end_at + window + late
    for action, resource in [(E.READ, e), (E.LIST, e), (E.READ, File(e, "raw/a.h5")),
                             (E.READ_ACTIVITY, e), (E.MODIFY, e), (E.UPLOAD, e)]:
        d = (policy.decide if policy else decide)(s, action, resource, now)
        assert not d.allowed, (action, d)


# (4) ---------------------------------------------------------------------------------------
@SETTINGS
@given(s=subjects(), e=experiments(), other=subjects(), project=projects(), now=times,
       requested_by=st.none() | USERS)
def test_only_the_pi_confirms_shares(s, e, other, project, now, requested_by):
    for share in (Share(e, other, requested_by=requested_by), Share(None, other, project=project),
                  Share(e, other, project=project), Share(None, other)):
        d = decide(s, E.CONFIRM_SHARE, share, now)
        if d.allowed:
            owner = (share.project.pi_id if share.project
                     else share.experiment.pi_id if share.experiment else None)
            assert s.user_id is not None and s.user_id == owner, d


# (5) ---------------------------------------------------------------------------------------
@SETTINGS
@given(s=subjects(states=st.sampled_from(INACTIVE)), e=experiments(), now=times, data=st.data())
def test_inactive_subjects_never_read_non_public_experiments(s, e, now, data):
    if not data.draw(st.booleans()):
        e = replace(e, public=False)
    if e.public and not e.proprietary:
        return  # public experiments are open to everybody
    for action in (E.READ, E.LIST):
        for resource in (e, File(e, "raw/a.h5"), Result(e, "comment")):
            d = decide(s, action, resource, now)
            assert not d.allowed, (action, resource, d)


# (6) + (7) ---------------------------------------------------------------------------------
@SETTINGS
@given(w=worlds())
def test_every_decision_is_well_formed_and_decide_never_raises(w):
    s, now, policy, resources = w
    for resource in resources:
        for action in ACTIONS:
            _well_formed(policy.decide(s, action, resource, now))


@EXTRA
@given(w=worlds(), action=st.text(max_size=20))
def test_unknown_actions_are_denied(w, action):
    s, now, policy, resources = w
    for resource in resources:
        d = policy.decide(s, action, resource, now)
        _well_formed(d)
        if action not in ACTIONS:
            assert not d.allowed and d.rule == "default.deny", d


# a few more invariants the documents imply ---------------------------------------------------
@EXTRA
@given(e=experiments(proprietary=st.just(True)), now=times, data=st.data())
def test_visitors_and_the_system_never_see_proprietary_data(e, now, data):
    rs = data.draw(result_sets(e))
    for actor in (ANONYMOUS, SYSTEM):
        for action, resource in _data_views(e, rs):
            d = decide(actor, action, resource, now)
            assert not d.allowed, (actor, action, d)


@EXTRA
@given(s=subjects(registered_only=True), e=experiments(), now=times)
def test_only_the_pi_archives_or_deletes(s, e, now):
    for action in (E.ARCHIVE, E.DELETE, E.AGREE_MIRROR, E.PUBLISH, E.UNPUBLISH, E.CORRECT):
        d = decide(s, action, e, now)
        if d.allowed:
            assert s.user_id == e.pi_id and s.state == "active", (action, d)
    d = decide(s, E.EXTEND, RetentionChange(e, e.retain_until), now)
    if d.allowed:
        assert s.user_id == e.pi_id


@EXTRA
@given(e=experiments(), now=times)
def test_the_system_expires_only_after_retain_until(e, now):
    d = decide(SYSTEM, E.EXPIRE, e, now)
    if d.allowed:
        assert e.deleted_at is None and e.retain_until is not None and now >= e.retain_until
