"""Notebook widgets over the datastore client: PIs manage roles, sharing, retention and the
audit trail; scientists browse and preview their data; everyone manages their own account.

    from labvault.widgets import RoleManager
    RoleManager("NLS-2026-0001")

Each widget talks to the datastore service with the user's JupyterHub token only
(``labvault.datastore.client.Client()``, or the ``client=`` given); the service decides every
action, and a refusal shows its reason inline.
"""

from .account import MyAccount
from .audit import AuditTrail
from .browser import ExperimentBrowser
from .retention import RetentionPanel
from .roles import RoleManager
from .sharing import SharingPanel

__all__ = ["AuditTrail", "ExperimentBrowser", "MyAccount", "RetentionPanel", "RoleManager", "SharingPanel"]
