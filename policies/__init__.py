"""Pure decision code: (subject, action, resource, now) -> Decision(allowed, rule, reason).

No I/O and no ORM imports: the datastore builds the frozen values in :mod:`.model` from its
rows and asks :func:`decide`. Every rule of the policy documents is named in :mod:`.rules`.
"""

from .engine import ACTIONS, Policy, decide, default_policy, set_default_policy
from .model import (
    ANONYMOUS,
    ROLES,
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
    Project,
    ProjectAccessChange,
    Registration,
    RequestRate,
    Result,
    ResultSet,
    RetentionChange,
    RoleChange,
    Share,
    SignIn,
    Subject,
)
from .privacy import truncate_ip
from .rules import RULES

__all__ = [
    "ACTIONS", "ANONYMOUS", "ROLES", "RULES", "SYSTEM", "Account", "AccountRecord", "Decision", "Department",
    "DepartmentAccessChange", "Environment", "Experiment", "ExpiryNotice", "File", "Grant", "NewExperiment",
    "NewResultSet", "Person", "PersonalItem", "Policy", "Project", "ProjectAccessChange",
    "Registration", "RequestRate", "Result", "ResultSet", "RetentionChange", "RoleChange", "Share", "SignIn", "Subject", "decide",
    "default_policy", "set_default_policy", "truncate_ip",
]
