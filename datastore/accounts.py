"""Accounts: local sign-up and sign-in (password, TOTP, lockout) and identity-provider sign-ins.

The service side of labvault's authenticators (``labvault.hub.auth`` / ``labvault.hub.oauth``):
the Hub holds no database and no secrets, so it asks the datastore service, which calls these
functions. Each one decides with the policy (``register`` / ``sign_in``), records the audit
event with the truncated IP, and applies the change in the same transaction. Passwords are
stored only as Argon2id hashes; e-mail confirmation tokens only as SHA-256 hashes with an
expiry; the full IP of the sign-up request and of the last login is kept on the account
(privacy statement), the audit log keeps it truncated.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pyotp
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import exists, select
from sqlalchemy.orm import Session
from traitlets import Int, Unicode
from traitlets.config import LoggingConfigurable

from labvault import policies as p
from labvault.policies import Decision

from . import audit
from .access import load_subject
from .models import (
    Department,
    Experiment,
    ExternalIdentity,
    Institution,
    InstitutionIdentifier,
    LocalCredential,
    Project,
    User,
    UserState,
)
from .operations import NAME_RE

EMAIL_RE = re.compile(r"^[^@\s]{1,64}@([a-z0-9-]{1,63}\.)+[a-z]{2,63}$")
TOTP_STEP = 30


class AccountError(Exception):
    """Bad input or a conflict: ``status`` (400, 404, 409), one line for a person."""

    def __init__(self, status: int, reason: str, rule: str = ""):
        super().__init__(reason)
        self.status, self.reason, self.rule = status, reason, rule


class LocalAccounts(LoggingConfigurable):
    """How local accounts work (the policy's part, e.g. lockout and TOTP, is in ``Policy``)."""

    confirmation_link_hours = Int(
        48,
        help="""Hours the link in a sign-up confirmation e-mail stays valid. Afterwards the
        person signs up again with the same name, e-mail and password to get a new link; an
        account never confirmed is deleted by the lifecycle job after Policy.tentative_account_days.""",
    ).tag(config=True)

    password_min_length = Int(
        10, help="Shortest password accepted at sign-up (characters).",
    ).tag(config=True)

    password_max_length = Int(
        1024, help="Longest password accepted (characters): hashing is deliberately expensive.",
    ).tag(config=True)

    argon2_time_cost = Int(
        3,
        help="""Argon2id iterations. The defaults (3 iterations, 64 MiB, 4 lanes) are RFC 9106's
        second recommended option, argon2-cffi's defaults; hashes made with other parameters
        are re-hashed at the next successful sign-in.""",
    ).tag(config=True)

    argon2_memory_kib = Int(65536, help="Argon2id memory in KiB (64 MiB).").tag(config=True)

    argon2_parallelism = Int(4, help="Argon2id lanes.").tag(config=True)

    totp_issuer = Unicode(
        "labvault",
        help="The issuer shown in authenticator apps for labvault's TOTP entries.",
    ).tag(config=True)

    @property
    def hasher(self) -> PasswordHasher:
        key = (self.argon2_time_cost, self.argon2_memory_kib, self.argon2_parallelism)
        if getattr(self, "_hasher_key", None) != key:
            self._hasher = PasswordHasher(time_cost=key[0], memory_cost=key[1], parallelism=key[2],
                                          type=Type.ID)
            self._hasher_key = key
            # a hash to verify against when the name is unknown, so that the answer takes as
            # long as for a known name (no account enumeration by timing)
            self._dummy_hash = self._hasher.hash(secrets.token_hex(16))
        return self._hasher

    @property
    def dummy_hash(self) -> str:
        self.hasher  # noqa: B018 - builds it
        return self._dummy_hash


@dataclass
class Outcome:
    """What a sign-up, confirmation or sign-in came to.

    ``result``: ``ok`` (signed in / registered), ``enrol_totp`` (the password was right and a
    second factor must be set up first: ``enrolment`` holds the provisioning URI) or
    ``refused`` (``decision`` says why).
    """

    result: str
    decision: Decision
    account: dict | None = None
    enrolment: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict:
        out: dict[str, Any] = {"result": self.result, "rule": self.decision.rule,
                               "reason": self.decision.reason}
        if self.account is not None:
            out["account"] = self.account
        if self.enrolment is not None:
            out["enrolment"] = self.enrolment
        out.update(self.extra)
        return out


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def clean_ip(ip: str | None) -> str | None:
    """The address as given if it is one, else None (never store raw input)."""
    if not ip:
        return None
    try:
        return str(ipaddress.ip_address(ip.strip().split("%", 1)[0]))
    except ValueError:
        return None


def _email_domain_matches(email: str, domains: set[str]) -> bool:
    domain = email.rsplit("@", 1)[-1].lower()
    return any(domain == d or domain.endswith("." + d) for d in domains)


def _domains(inst: Institution) -> set[str]:
    return {i.value.lower() for i in inst.identifiers if i.kind == "email_domain"}


def is_pi(session: Session, user_id: int) -> bool:
    """PI of an experiment, a project or a department."""
    return bool(session.scalar(select(
        exists().where(Experiment.pi_id == user_id)
        | exists().where(Project.pi_id == user_id)
        | exists().where(Department.pi_id == user_id)
    )))


def account_view(session: Session, user: User) -> dict:
    """The account as the Hub needs it (also what rides in auth_state)."""
    inst = session.get(Institution, user.institution_id) if user.institution_id else None
    return {
        "name": user.name,
        "display_name": user.display_name,
        "state": user.state.value,
        "admin": user.is_admin,
        "institution": inst.name if inst else None,
        "institution_verified": bool(inst and inst.verified),
        "is_vendor": bool(inst and inst.is_vendor),
        "is_facility": bool(inst and inst.is_facility),
        "pi_verified": user.institutional_email_verified_at is not None,
        "is_pi": is_pi(session, user.id),
    }


def _normalise_code(code: str | None) -> str | None:
    if code is None:
        return None
    code = re.sub(r"\s+", "", str(code))
    return code or None


def totp_counter(secret: str, code: str, now: datetime, after: int | None, window: int = 1) -> int | None:
    """The time step at which ``code`` is valid (within ±``window`` steps of ``now``), if it is
    newer than ``after`` (a code, once used, is never accepted again); else None."""
    totp = pyotp.TOTP(secret, interval=TOTP_STEP)
    for offset in range(-window, window + 1):
        t = now + timedelta(seconds=offset * TOTP_STEP)
        if hmac.compare_digest(totp.at(t), code):
            counter = totp.timecode(t)
            if after is not None and counter <= after:
                return None
            return counter
    return None


# ---------------------------------------------------------------------------------------
# the accounts service
# ---------------------------------------------------------------------------------------
class Accounts:
    """Account operations over one database (``sessions``), one policy and one mailer."""

    def __init__(self, sessions, settings: LocalAccounts | None = None, policy: p.Policy | None = None,
                 mailer=None):
        self.sessions = sessions
        self.settings = settings or LocalAccounts()
        self.policy = policy or p.default_policy()
        self.mailer = mailer

    # audit -----------------------------------------------------------------------------
    def _audit(self, session: Session, actor: str, action: str, target: str, decision: Decision,
               ip: str | None, now: datetime, details: dict | None = None) -> None:
        audit.append(session, actor=actor[:100], action=action, target=target, decision=decision,
                     ip=ip, details=details, now=now, ipv4_masked_bytes=self.policy.ipv4_masked_bytes,
                     ipv6_prefix_bits=self.policy.ipv6_prefix_bits)

    def _refuse(self, actor: str, action: str, target: str, decision: Decision, ip: str | None,
                now: datetime, details: dict | None = None) -> Outcome:
        with self.sessions.begin() as s:
            self._audit(s, actor, action, target, decision, ip, now, details)
        return Outcome("refused", decision)

    # institutions offered at sign-up ---------------------------------------------------
    def institutions(self) -> list[dict]:
        """Verified institutions and their e-mail domains, as offered on the sign-up page."""
        with self.sessions() as s:
            insts = s.scalars(select(Institution).where(Institution.verified.is_(True))
                              .order_by(Institution.name)).all()
            return [{"name": i.name, "domains": sorted(_domains(i))} for i in insts]

    # passwords -------------------------------------------------------------------------
    def _check_password_shape(self, password: str) -> None:
        if not isinstance(password, str) or len(password) < self.settings.password_min_length:
            raise AccountError(400, f"the password needs at least {self.settings.password_min_length} characters")
        if len(password) > self.settings.password_max_length:
            raise AccountError(400, f"the password may have at most {self.settings.password_max_length} characters")

    def hash_password(self, password: str) -> str:
        return self.settings.hasher.hash(password)

    def verify_password(self, stored: str | None, password: str) -> bool:
        """Argon2id verification; an unknown account is verified against a dummy hash."""
        if not isinstance(password, str) or len(password) > self.settings.password_max_length:
            password = ""
        try:
            return self.settings.hasher.verify(stored or self.settings.dummy_hash, password) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def set_password(self, name: str, password: str, now: datetime, actor: str = "operator") -> None:
        """Set (or reset) a local account's password, e.g. for operator-made accounts."""
        self._check_password_shape(password)
        hashed = self.hash_password(password)
        with self.sessions.begin() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is None:
                raise AccountError(404, f"no labvault account {name!r}")
            cred = s.get(LocalCredential, user.id)
            if cred is None:
                cred = LocalCredential(user_id=user.id, password_hash=hashed, created_at=now)
                s.add(cred)
            cred.password_hash, cred.failed_attempts, cred.locked_until = hashed, 0, None
            cred.updated_at = now
            self._audit(s, actor, "account.password", f"user:{name}",
                        Decision(True, "signin.credentials", "password set"), None, now)

    # sign-up ---------------------------------------------------------------------------
    def signup(self, *, name: str, display_name: str, institution: str, email: str, password: str,
               adult: bool, ip: str | None, link_base: str, now: datetime) -> Outcome:
        """Register a tentative account and send the confirmation link to ``email``.

        Signing up again with the same name, e-mail and password while the account is still
        tentative sends a new link (the old one stops working).
        """
        name = (name or "").strip().lower()
        email = (email or "").strip().lower()
        display_name = " ".join((display_name or "").split())
        if not NAME_RE.match(name):
            raise AccountError(400, f"bad user name {name!r}: lower-case letters, digits and . _ @ - (at most 100)")
        if not display_name or len(display_name) > 200 or not display_name.isprintable():
            raise AccountError(400, "give your first and last name (at most 200 characters)")
        if len(email) > 255 or not EMAIL_RE.match(email):
            raise AccountError(400, f"not an e-mail address: {email[:80]!r}")
        if not link_base.startswith(("http://", "https://")):
            raise AccountError(400, "link_base must be the Hub's confirmation URL (http[s]://…)")
        self._check_password_shape(password)
        ip = clean_ip(ip)
        hashed = self.hash_password(password)
        token = secrets.token_urlsafe(32)
        with self.sessions() as s:  # read and decide; the write comes after the slow checks
            inst = s.scalar(select(Institution).where(Institution.name == (institution or "").strip()))
            reg = p.Registration(
                institution_id=inst.id if inst else None,
                institution_name=inst.name if inst else "",
                institution_verified=bool(inst and inst.verified),
                email_at_institution=bool(inst and _email_domain_matches(email, _domains(inst))),
                adult=adult is True,  # the JSON value true, nothing that merely looks like it
            )
            decision = self.policy.decide(p.ANONYMOUS, "register", reg, now)
            existing = s.scalar(select(User).where(User.name == name))
            resend = False
            if decision.allowed and existing is not None:
                cred = s.get(LocalCredential, existing.id)
                resend = (existing.state == UserState.tentative and cred is not None
                          and (existing.email or "") == email and existing.institution_id == reg.institution_id
                          and self.verify_password(cred.password_hash, password))
                if not resend:
                    raise AccountError(409, f"the user name {name!r} is taken: choose another one")
        if not decision.allowed:
            return self._refuse("anonymous", "account.signup", f"user:{name}", decision, ip, now,
                                {"institution": institution[:200] if isinstance(institution, str) else None})
        with self.sessions.begin() as s:
            if resend:
                user = s.scalar(select(User).where(User.name == name))
                cred = s.get(LocalCredential, user.id)
            else:
                if s.scalar(select(User.id).where(User.name == name)):  # taken meanwhile
                    raise AccountError(409, f"the user name {name!r} is taken: choose another one")
                user = User(name=name, display_name=display_name, institution_id=reg.institution_id,
                            email=email, institutional_email=email, state=UserState.tentative,
                            created_at=now)
                s.add(user)
                s.flush()
                cred = LocalCredential(user_id=user.id, password_hash=hashed, created_at=now,
                                       adult_confirmed_at=now, signup_ip=ip)
                s.add(cred)
            cred.email_token_hash = token_hash(token)
            cred.email_token_expires_at = now + timedelta(hours=self.settings.confirmation_link_hours)
            cred.updated_at = now
            self._audit(s, name, "account.signup", f"user:{name}", decision, ip, now,
                        {"institution": reg.institution_name, "resend": resend})
            # sent inside the transaction: if the mail server refuses it, nothing was registered
            self._send_confirmation(email, name, display_name, reg.institution_name, link_base, token)
        return Outcome("ok", decision, extra={"name": name, "email_sent": self.mailer is not None})

    def _send_confirmation(self, email: str, name: str, display_name: str, institution: str,
                           link_base: str, token: str) -> None:
        if self.mailer is None:
            raise AccountError(503, "no mail server is configured: confirmation links cannot be sent")
        sep = "&" if "?" in link_base else "?"
        link = f"{link_base}{sep}token={token}"
        hours = self.settings.confirmation_link_hours
        body = (
            f"Hello {display_name},\n\n"
            f"someone (hopefully you) registered the labvault account {name!r} as a member of "
            f"{institution} with this e-mail address.\n\n"
            f"To confirm it, open this link within {hours} hours and sign in:\n\n{link}\n\n"
            "Opening the link proves that this address, and so your membership, is yours.\n"
            "If it was not you, ignore this message: the account stays unconfirmed and is deleted.\n"
        )
        self.mailer.send(email, "Confirm your labvault account", body,
                         headers={"X-Labvault-Confirmation-Link": link})

    # confirmation ----------------------------------------------------------------------
    def confirm(self, *, token: str, name: str, password: str, totp: str | None, ip: str | None,
                now: datetime) -> Outcome:
        """Open the confirmation link: with the account's password, the account becomes active
        and the address (at the institution's verified domain) proves the membership; then the
        person is signed in (the same decision as :meth:`login`)."""
        ip = clean_ip(ip)
        name = (name or "").strip().lower()
        unknown = Decision(False, "account.registration",
                           "this confirmation link is unknown, used or expired: sign up again with "
                           "the same details to get a new one")
        if not isinstance(token, str) or not 20 <= len(token) <= 200:
            return self._refuse("anonymous", "account.confirm", "link", unknown, ip, now)
        with self.sessions() as s:
            cred = s.scalar(select(LocalCredential).where(LocalCredential.email_token_hash == token_hash(token)))
            user = s.get(User, cred.user_id) if cred else None
            stored = cred.password_hash if cred else None
        if cred is None or user is None or cred.email_token_expires_at is None or now >= cred.email_token_expires_at:
            return self._refuse("anonymous", "account.confirm", "link", unknown, ip, now)
        if user.name != name or not self.verify_password(stored, password):
            # the link alone is not enough: who confirms knows the password chosen at sign-up
            return self._failed_password(user.id, name, ip, now, "account.confirm")
        with self.sessions.begin() as s:
            user = s.get(User, user.id)
            cred = s.get(LocalCredential, user.id)
            inst = s.get(Institution, user.institution_id) if user.institution_id else None
            if user.state != UserState.tentative:
                d = Decision(False, "account.state", f"the account is {user.state.value}, not waiting for confirmation")
                self._audit(s, user.name, "account.confirm", f"user:{user.name}", d, ip, now)
                return Outcome("refused", d)
            if inst is None or not inst.verified or not _email_domain_matches(user.email or "", _domains(inst)):
                d = Decision(False, "account.registration",
                             "your e-mail address is no longer at a verified domain of your institution")
                self._audit(s, user.name, "account.confirm", f"user:{user.name}", d, ip, now)
                return Outcome("refused", d)
            user.state = UserState.active
            user.confirmed_at = now
            user.institutional_email = user.email
            user.institutional_email_verified_at = now
            cred.email_token_hash = cred.email_token_expires_at = None
            cred.updated_at = now
            self._audit(s, user.name, "account.confirm", f"user:{user.name}",
                        Decision(True, "account.registration",
                                 f"e-mail confirmed: the account is active, a member of {inst.name}"), ip, now)
        return self._decide_login(user.id, password_ok=True, totp=totp, ip=ip, now=now)

    # sign-in ---------------------------------------------------------------------------
    def login(self, *, name: str, password: str, totp: str | None, ip: str | None, now: datetime) -> Outcome:
        """A password sign-in (with a TOTP code where one is needed)."""
        ip = clean_ip(ip)
        name = (name or "").strip().lower()
        with self.sessions() as s:
            user = s.scalar(select(User).where(User.name == name)) if len(name) <= 100 else None
            cred = s.get(LocalCredential, user.id) if user is not None else None
            stored = cred.password_hash if cred else None
            locked = cred is not None and cred.locked_until is not None and now < cred.locked_until
        if cred is None:
            self.verify_password(None, password)  # as long as a real check
            return self._refuse("anonymous", "account.sign_in", f"user:{name[:100]}",
                                Decision(False, "signin.credentials", "wrong user name or password"), ip, now)
        # a locked account is refused before its password is looked at
        password_ok = False if locked else self.verify_password(stored, password)
        if password_ok and self.settings.hasher.check_needs_rehash(stored):
            self._rehash(user.id, password, now)
        return self._decide_login(user.id, password_ok=password_ok, totp=totp, ip=ip, now=now)

    def _rehash(self, user_id: int, password: str, now: datetime) -> None:
        hashed = self.hash_password(password)
        with self.sessions.begin() as s:
            cred = s.get(LocalCredential, user_id)
            cred.password_hash, cred.updated_at = hashed, now

    def _failed_password(self, user_id: int, name: str, ip: str | None, now: datetime, action: str) -> Outcome:
        return self._decide_login(user_id, password_ok=False, totp=None, ip=ip, now=now, action=action)

    def _lock_query(self, s: Session, user_id: int) -> LocalCredential:
        q = select(LocalCredential).where(LocalCredential.user_id == user_id)
        if s.get_bind().dialect.name == "postgresql":
            q = q.with_for_update()  # counting failures: no lost updates between parallel tries
        return s.scalars(q).one()

    def _decide_login(self, user_id: int, *, password_ok: bool, totp: str | None, ip: str | None,
                      now: datetime, action: str = "account.sign_in") -> Outcome:
        """Decide a password sign-in with the policy, count failures, lock, record the login."""
        code = _normalise_code(totp)
        with self.sessions.begin() as s:
            cred = self._lock_query(s, user_id)
            user = s.get(User, user_id)
            enrolled = cred.totp_confirmed_at is not None and cred.totp_secret is not None
            counter = None
            if password_ok and enrolled and code is not None:
                counter = totp_counter(cred.totp_secret, code, now, cred.totp_last_counter)
            attempt = p.SignIn(
                "password", password_ok=password_ok, locked_until=cred.locked_until,
                totp_enrolled=enrolled, totp_ok=None if (code is None or not enrolled) else counter is not None,
                is_pi=is_pi(s, user_id),
            )
            subject = load_subject(s, user, now)
            decision = self.policy.decide(subject, "sign_in", attempt, now)
            outcome = Outcome("refused", decision)
            details: dict[str, Any] = {"method": "password"}
            failed = decision.rule == "signin.credentials" and not decision.allowed or (
                decision.rule == "signin.second_factor" and attempt.totp_ok is False)
            if failed:
                cred.failed_attempts += 1
                limit = self.policy.signin_lockout_attempts
                if limit > 0 and cred.failed_attempts >= limit:
                    cred.locked_until = now + timedelta(minutes=self.policy.signin_lockout_minutes)
                    cred.failed_attempts = 0
                    details["locked_until"] = cred.locked_until.isoformat()
                    decision = Decision(False, "signin.lockout",
                                        f"{decision.reason}; after {limit} failed sign-ins the account "
                                        f"is locked until {cred.locked_until.strftime('%Y-%m-%d %H:%M')} UTC")
                    outcome = Outcome("refused", decision)
            elif decision.allowed:
                cred.failed_attempts, cred.locked_until = 0, None
                if counter is not None:
                    cred.totp_last_counter = counter
                user.last_login_ip, user.last_login_at = ip, now  # full, on the account only
                outcome = Outcome("ok", decision, account=account_view(s, user))
            elif decision.rule == "signin.second_factor" and not enrolled:
                # the password was right: show the (pending) secret to set up the second factor
                if not cred.totp_secret or cred.totp_confirmed_at is not None:
                    cred.totp_secret, cred.totp_confirmed_at = pyotp.random_base32(), None
                outcome = Outcome("enrol_totp", decision, enrolment=self._enrolment(user.name, cred.totp_secret))
            cred.updated_at = now
            self._audit(s, user.name, action, f"user:{user.name}", decision, ip, now, details)
        return outcome

    def _enrolment(self, name: str, secret: str) -> dict:
        uri = pyotp.TOTP(secret, interval=TOTP_STEP).provisioning_uri(name=name, issuer_name=self.settings.totp_issuer)
        return {"provisioning_uri": uri, "secret": secret, "issuer": self.settings.totp_issuer}

    # TOTP ------------------------------------------------------------------------------
    def start_totp(self, *, name: str, now: datetime) -> dict:
        """Voluntary enrolment of a signed-in user: a new pending secret (confirmed by a code)."""
        with self.sessions.begin() as s:
            user = s.scalar(select(User).where(User.name == name))
            cred = s.get(LocalCredential, user.id) if user else None
            if cred is None:
                raise AccountError(404, f"{name!r} has no local account (identity-provider accounts "
                                   "use their provider's second factor)")
            if user.state != UserState.active:
                raise AccountError(403, f"the account is {user.state.value}", "account.state")
            if cred.totp_confirmed_at is not None:
                raise AccountError(409, "two-factor authentication is set up already", "signin.second_factor")
            if not cred.totp_secret:
                cred.totp_secret = pyotp.random_base32()
            cred.updated_at = now
            return self._enrolment(user.name, cred.totp_secret)

    def confirm_totp(self, *, name: str, code: str, ip: str | None, now: datetime, sign_in: bool) -> Outcome:
        """Confirm a pending TOTP secret with a code from the app.

        ``sign_in``: the Hub checked the password moments ago (enrolment at sign-in), so a
        right code also signs the person in — through the same policy decision as
        :meth:`login`. Otherwise (voluntary enrolment of a signed-in user) it only enrols.
        """
        ip = clean_ip(ip)
        code = _normalise_code(code)
        with self.sessions() as s:
            user = s.scalar(select(User).where(User.name == (name or "").strip().lower()))
            cred = s.get(LocalCredential, user.id) if user else None
        if cred is None or not cred.totp_secret:
            raise AccountError(404, "no two-factor set-up is waiting for this account: sign in again")
        if cred.totp_confirmed_at is not None:
            if sign_in:
                return self._decide_login(user.id, password_ok=True, totp=code, ip=ip, now=now)
            raise AccountError(409, "two-factor authentication is set up already", "signin.second_factor")
        with self.sessions.begin() as s:
            cred = self._lock_query(s, user.id)
            counter = totp_counter(cred.totp_secret, code, now, cred.totp_last_counter) if code else None
            if counter is None:
                d = Decision(False, "signin.second_factor", "wrong or expired code: enter the current "
                             "code of the authenticator app you just set up")
                self._audit(s, user.name, "account.totp", f"user:{user.name}", d, ip, now)
                return Outcome("refused", d)
            cred.totp_confirmed_at, cred.totp_last_counter, cred.updated_at = now, counter, now
            self._audit(s, user.name, "account.totp", f"user:{user.name}",
                        Decision(True, "signin.second_factor", "two-factor authentication set up"), ip, now)
        if not sign_in:
            return Outcome("ok", Decision(True, "signin.second_factor", "two-factor authentication set up"))
        # the code just used proves the second factor for this sign-in
        return self._sign_in_enrolled(user.id, ip, now)

    def _sign_in_enrolled(self, user_id: int, ip: str | None, now: datetime) -> Outcome:
        with self.sessions.begin() as s:
            cred = self._lock_query(s, user_id)
            user = s.get(User, user_id)
            attempt = p.SignIn("password", password_ok=True, locked_until=cred.locked_until,
                               totp_enrolled=True, totp_ok=True, is_pi=is_pi(s, user_id))
            decision = self.policy.decide(load_subject(s, user, now), "sign_in", attempt, now)
            outcome = Outcome("refused", decision)
            if decision.allowed:
                cred.failed_attempts, cred.locked_until = 0, None
                user.last_login_ip, user.last_login_at = ip, now
                outcome = Outcome("ok", decision, account=account_view(s, user))
            self._audit(s, user.name, "account.sign_in", f"user:{user.name}", decision, ip, now,
                        {"method": "password", "totp_enrolled_now": True})
        return outcome

    # sessions --------------------------------------------------------------------------
    def session(self, *, name: str, now: datetime) -> Outcome:
        """Re-check a signed-in user (the Hub's refresh_user): state and institution.

        Refusals are audited; a check that finds nothing changed is not an event."""
        with self.sessions() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is None:
                d = Decision(False, "account.state", f"no labvault account {name!r}")
            else:
                d = self.policy.decide(load_subject(s, user, now), "sign_in", p.SignIn("session"), now)
                if d.allowed:
                    return Outcome("ok", d, account=account_view(s, user))
        return self._refuse(name[:100] if user else "anonymous", "account.session", f"user:{name[:100]}", d, None, now)

    # identity providers ----------------------------------------------------------------
    def idp_login(self, *, idp: str, subject: str, claims: list[str], username: str,
                  display_name: str = "", email: str | None = None, ip: str | None = None,
                  now: datetime, refresh: bool = False) -> Outcome:
        """A sign-in through an identity provider (or the Hub's re-check of one, ``refresh``).

        ``claims`` are the institution claim's values (e.g. schacHomeOrganization, or the
        scopes of eduPersonScopedAffiliation): the first that names a registered institution
        for which ``idp`` is registered decides. An e-mail address is never looked at for
        membership (CVE-2022-31027). A first sign-in creates the account (or links an
        operator-made one of the same name and institution that has no password and no
        identity at this provider).
        """
        ip = clean_ip(ip)
        if not isinstance(idp, str) or not idp.strip() or len(idp) > 255:
            raise AccountError(400, "idp must name the identity provider")
        if not isinstance(subject, str) or not subject.strip() or len(subject) > 255:
            raise AccountError(400, "subject must be the identity provider's user id (sub)")
        idp, subject = idp.strip(), subject.strip()
        values = [c.strip().lower() for c in claims if isinstance(c, str) and c.strip()][:50]
        with self.sessions.begin() as s:
            chosen, inst, allowed = (values[0] if values else None), None, False
            for value in values:
                found = s.scalar(select(Institution).join(InstitutionIdentifier).where(
                    InstitutionIdentifier.value == value,
                    InstitutionIdentifier.kind.in_(("idp", "email_domain"))))
                if found is None:
                    continue
                ok = bool(s.scalar(select(InstitutionIdentifier.id).where(
                    InstitutionIdentifier.institution_id == found.id, InstitutionIdentifier.kind == "idp",
                    InstitutionIdentifier.value == idp)))
                if inst is None or ok:
                    chosen, inst, allowed = value, found, ok
                if ok:
                    break
            identity = s.scalar(select(ExternalIdentity).where(ExternalIdentity.idp == idp,
                                                                ExternalIdentity.subject == subject))
            user = s.get(User, identity.user_id) if identity else None
            created = linked = False
            if user is not None:
                who = load_subject(s, user, now)
            elif refresh:
                d = Decision(False, "account.state", "no account is linked to this identity")
                self._audit(s, "anonymous", "account.session", f"idp:{idp}", d, ip, now)
                return Outcome("refused", d)
            else:  # the account it would be: active, at the claimed institution
                who = p.Subject(user_id=0, name=username, institution_id=inst.id if inst else None,
                                institution_verified=bool(inst and inst.verified), state="active")
            attempt = p.SignIn("idp", idp=idp, claim=chosen, claim_institution_id=inst.id if inst else None,
                               idp_allowed=allowed, is_pi=bool(user and is_pi(s, user.id)))
            decision = self.policy.decide(who, "sign_in", attempt, now)
            actor = user.name if user else "anonymous"
            action = "account.session" if refresh else "account.sign_in"
            details = {"method": "idp", "idp": idp[:200], "claim": (chosen or "")[:200]}
            if not decision.allowed:
                self._audit(s, actor, action, f"user:{user.name}" if user else f"idp:{idp}", decision, ip, now, details)
                return Outcome("refused", decision)
            if refresh:
                return Outcome("ok", decision, account=account_view(s, user))
            if user is None:
                user, linked = self._new_or_linked_user(s, username, display_name, email, inst, now)
                created = not linked
                s.add(ExternalIdentity(user_id=user.id, idp=idp, subject=subject, created_at=now))
                s.flush()
                identity = s.scalar(select(ExternalIdentity).where(ExternalIdentity.idp == idp,
                                                                    ExternalIdentity.subject == subject))
            identity.claims = {"institution": chosen}
            identity.last_seen_at = now
            if user.institutional_email_verified_at is None:
                # the IdP's claim proves the membership a PI needs (DESIGN: claim or e-mail link)
                user.institutional_email_verified_at = now
                if email and EMAIL_RE.match(email.strip().lower()) and not user.institutional_email:
                    user.institutional_email = email.strip().lower()
            user.last_login_ip, user.last_login_at = ip, now
            details.update(created=created, linked=linked)
            self._audit(s, user.name, action, f"user:{user.name}", decision, ip, now, details)
            return Outcome("ok", decision, account=account_view(s, user))

    def _new_or_linked_user(self, s: Session, username: str, display_name: str, email: str | None,
                            inst: Institution, now: datetime) -> tuple[User, bool]:
        name = (username or "").strip().lower()
        if not NAME_RE.match(name):
            raise AccountError(400, f"the identity provider's user name {name[:100]!r} is not a valid "
                               "labvault name; ask an administrator")
        existing = s.scalar(select(User).where(User.name == name))
        if existing is not None:
            has_password = s.get(LocalCredential, existing.id) is not None
            has_identity = s.scalar(select(ExternalIdentity.id).where(ExternalIdentity.user_id == existing.id))
            if existing.institution_id != inst.id or has_password or has_identity:
                raise AccountError(409, f"the account name {name!r} belongs to another person; an "
                                   "administrator can link your identity to the right account",
                                   "signin.institution")
            return existing, True
        email = (email or "").strip().lower() or None
        if email and not EMAIL_RE.match(email):
            email = None
        user = User(name=name, display_name=" ".join((display_name or name).split())[:200] or name,
                    institution_id=inst.id, email=email, institutional_email=email,
                    institutional_email_verified_at=now, state=UserState.active, created_at=now,
                    confirmed_at=now)
        s.add(user)
        s.flush()
        return user, False

