"""The catalogue of named rules: each names the sentence of the policy document it implements.

Every Decision's ``rule`` is a key of :data:`RULES`; ``tests/test_policy_rules.py`` checks that
each rule is exercised on its allow side and its deny side (where it has both).
"""

from __future__ import annotations

from dataclasses import dataclass

PDH = "proprietary-data-handling"
PRIV = "privacy-statement"
DPAC = "department-project-access-control"
LV = "labvault (documented choice)"


@dataclass(frozen=True)
class Rule:
    name: str
    source: str
    text: str


_RULES = [
    # --- proprietary data handling ------------------------------------------------------
    Rule("proprietary.pi_owner", PDH,
         "The Principal Investigator (PI) is the legal owner or delegated owner of proprietary "
         "data and has full authority over its access and management."),
    Rule("proprietary.assigned_only", PDH,
         "Only users explicitly assigned by the PI may access proprietary data."),
    Rule("proprietary.never_public", PDH,
         "This data can never be made publicly available under any circumstances."),
    Rule("facility.access_window", PDH,
         "For data uploaded through a facility such as a Synchrotron, the facility staff "
         "scientists lose access to proprietary data thirty days after an experiment concludes."),
    Rule("vendor.never", PDH,
         "Employees of DECTRIS Ltd. (the vendor) are never permitted access; data access to "
         "vendor employees is strongly restricted."),
    Rule("retention.pi_only", PDH,
         "The PI has sole authority to extend storage, archive, or delete data."),
    Rule("retention.default_minimum", PDH,
         "The default minimum storage period for archived data is 1 year, unless manually deleted."),
    Rule("retention.expiry_deletes", PDH,
         "If the storage period expires and is not extended, the data will be permanently deleted."),
    Rule("retention.deleted", PDH,
         "Permanently deleted data cannot be read; its metadata stub and audit trail remain."),
    Rule("modify.authorised_roles", PDH, "Only authorized users may modify proprietary data."),
    Rule("sharing.same_institution", PDH,
         "Sharing of data with other users is possible without restrictions, as long as both "
         "users belong to the same authenticated institution."),
    Rule("sharing.cross_institution_pi_confirm", PDH,
         "Sharing with personnel outside the institution must be confirmed by the PI of the "
         "experiment or project."),
    Rule("environment.licensed", PDH,
         "Software environments used for proprietary data must ensure the relevant commercial "
         "licenses are obtained before."),
    Rule("environment.proprietary_institution_only", PDH,
         "Custom proprietary software environments can not be made publicly accessible and can "
         "only be shared with members of the same institution."),
    Rule("mirror.pi_agreed", PDH, "Data is not mirrored or backed up unless agreed on."),
    Rule("proprietary.no_service_use", PDH,
         "Any data marked as proprietary will not be used to improve or extend the service's "
         "capabilities."),
    Rule("audit.full_trail", PDH,
         "A secure audit log records all access and modifications to ensure transparency and "
         "accountability (the full trail is shown to the PI and to admins)."),
    # --- department / project access control ------------------------------------------
    Rule("department.member_read_modify", DPAC,
         "By default, a user has read & modify rights to data from the department they belong "
         "to; individual users can be granted access to read or modify data from one or more "
         "departments."),
    Rule("department.unpublished_result_sets", DPAC,
         "You can see any data owned by the departments that you have access to, including "
         "un-published result sets."),
    Rule("project.read_only", DPAC,
         "Individual users can be granted access to data from specific projects, even if they "
         "don't have access to the department where it originates. Project based access is read "
         "only."),
    Rule("user.own_data", DPAC,
         "Some data are available only to the single user who owns the data."),
    Rule("admin.access_rights", DPAC,
         "A few data are available only to admin users, such as access rights management."),
    Rule("ownership.default_department", DPAC,
         "New primary entities are associated with your own department by default; you can "
         "assign another department if you have write access to it."),
    Rule("ownership.upload_results", DPAC,
         "You can upload result sets for experiments associated with departments that you have "
         "write access to; if the experiment is associated with projects, you also need project "
         "access."),
    Rule("result_set.published_visibility", DPAC,
         "Result sets are only visible outside the department once published."),
    Rule("derived.parent", DPAC,
         "Steps, results and comments are accessed through the entity they belong to (steps "
         "through their experiment, results through their result sets, comments through the "
         "entity they are associated with)."),
    Rule("stub.existence", DPAC,
         "Even without access you can see that an entity exists: ID, name, owner department / "
         "user, class and type, status (primary entities only, never proprietary ones)."),
    Rule("list.hide_inaccessible", DPAC,
         "When you browse the general entity list pages, you will not see the entities that are "
         "inaccessible with your current access rights."),
    # --- privacy statement -------------------------------------------------------------
    Rule("account.state", PRIV,
         "Only confirmed (registered, active) users use the service; tentatively registered, "
         "deactivated and closed accounts have no access."),
    Rule("account.registration", PRIV,
         "Registering needs first and last name, a (verified) academic institution, an e-mail "
         "address and a password; the account stays tentative until the link in the "
         "confirmation e-mail is opened. For local accounts the e-mail must be at one of the "
         "institution's verified domains: the opened link, never the typed address, proves "
         "membership."),
    Rule("account.adult", PRIV,
         "We do not knowingly solicit personal data from children under 18 years of age: "
         "registering needs the confirmation of being 18 or older."),
    Rule("pi.verified_institution", PRIV,
         "Each registered user that wants to be owner of an experiment (PI) must be associated "
         "with a scientific institution, verified using an institutional email address."),
    Rule("privacy.identity", PRIV,
         "As a registered user you are only identifiable with your first and last name together "
         "with your academic institution."),
    Rule("privacy.email_private", PRIV,
         "Your email address will not be shared with other registered or non-registered users "
         "unless explicitly authorized by you."),
    Rule("privacy.members_visible", PRIV,
         "Once you assume a role in an Experiment, Team or Project, your name and institution are "
         "visible to all other registered users linked to it; if the experiment is made public, "
         "they become publicly visible."),
    Rule("privacy.activity_log", PRIV,
         "A log of scientific activities will be visible to all other participants of the same "
         "Experiment, Team or Project."),
    Rule("privacy.own_access_log", PRIV,
         "Right of access by the data subject: a user may see what is recorded about their own "
         "activity."),
    Rule("privacy.personal_repository", PRIV,
         "You are the sole owner of your personal scientific data; your name becomes visible to "
         "others only if you share specific files or folders with them."),
    Rule("privacy.role_history_kept", PRIV,
         "Even if your account has been deleted we will retain any role transaction and activity "
         "logs of past roles you held."),
    Rule("privacy.tentative_expiry", PRIV,
         "If you do not activate your account, any personal data you provided during "
         "registration will be deleted after 12 months."),
    Rule("privacy.closed_roles_removed", PRIV,
         "If you decide to delete your account, we will remove your active role within the "
         "experiment (the record of past roles is kept)."),
    Rule("privacy.closed_anonymised", PRIV,
         "Personal data from closed or inactive accounts will be deleted or anonymized one year "
         "after the account is closed or deactivated."),
    Rule("privacy.minors", PRIV,
         "If we learn that personal information from users less than 18 years of age has been "
         "collected, we will deactivate the account and take reasonable measures to promptly "
         "delete such data."),
    Rule("privacy.metadata_exempt", PRIV,
         "Descriptive metadata of experiments is exempt from the right to be removed unless "
         "incorrect."),
    Rule("privacy.data_subject_rights", PRIV,
         "You may access, correct, export and request deletion of your personal data, and close "
         "your account."),
    Rule("abuse.rate_limit", PRIV,
         "We process the number of page views to detect and prevent data harvesting (each user's "
         "request rate is limited)."),
    Rule("public.open_experiment", PRIV,
         "Experimental data will be made publicly accessible upon request of the legal owner."),
    # --- labvault's own --------------------------------------------------------------
    Rule("retention.expiry_notice", LV,
         "The PI is told by e-mail before the storage period of their data expires (by default "
         "30 and 7 days before, once each), so that it can be extended in time."),
    Rule("facility.access_notice", LV,
         "Facility staff are told by e-mail before their access to an experiment ends (by default "
         "7 days before)."),
    Rule("role.grant", LV,
         "An active, unexpired role grant on the experiment opens it at that role's level."),
    Rule("role.manage", LV,
         "Roles on an experiment are managed by its PI and by managers the PI appointed; a "
         "manager cannot appoint managers. The PI role is the experiment's owner and is not "
         "granted."),
    Rule("experiment.create", LV,
         "Experiments are registered by admins and facility staff for a PI, or by a verified PI "
         "for themselves."),
    Rule("signin.credentials", LV,
         "A local account signs in with its password, which is stored only as an Argon2id hash."),
    Rule("signin.lockout", LV,
         "After repeated failed sign-ins (wrong passwords or codes) an account is locked for a "
         "while."),
    Rule("signin.second_factor", LV,
         "Local accounts of PIs (and of anyone who enrolled) sign in with a second factor, a "
         "TOTP code."),
    Rule("signin.institution", LV,
         "Users sign in as members of a verified institution. Membership is proven by the "
         "claim of an identity provider registered for that institution, or by a confirmed "
         "address at one of its verified e-mail domains; an e-mail string alone never proves "
         "it (oauthenticator CVE-2022-31027)."),
    Rule("default.deny", LV, "Nothing is allowed unless a rule allows it."),
]

RULES: dict[str, Rule] = {r.name: r for r in _RULES}
