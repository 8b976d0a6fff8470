"""Hub-internal API for accounts: sign-up, e-mail confirmation, login (password, TOTP, lockout), identity-provider logins."""

from __future__ import annotations

ROUTES: list[tuple[str, type]] = []
