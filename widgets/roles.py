"""``RoleManager(exid)``: who has which role on an experiment; grant by search, revoke.

Members are shown with name and institution only (an e-mail only where its owner allowed it:
the service decides). Facility staff are shown with the day their access ends. A refused
grant or revocation shows the policy's reason inline and changes nothing.
"""

from __future__ import annotations

from urllib.parse import quote

import ipywidgets as W

from labvault.datastore.client import Client

from .common import STYLE, LabvaultWidget, PeopleSearch, day, end_of_day, esc, parse_time

ROLE_CHOICES = [
    ("viewer: reads the data", "viewer"),
    ("writer: reads and adds data", "writer"),
    ("manager: also manages roles", "manager"),
    ("facility staff: until 30 days after the end", "facility_staff"),
]


class RoleManager(LabvaultWidget):
    """Members of experiment ``exid`` and their roles; grant and revoke (PI and managers)."""

    def __init__(self, exid: str, *, client: Client | None = None, **kwargs):
        super().__init__(client=client, **kwargs)
        self.exid = exid
        self.members: list[dict] = []
        self.header = W.HTML()
        self.table = W.GridBox(layout=W.Layout(grid_template_columns="repeat(5, auto)", grid_gap="2px 12px"))
        self.people = PeopleSearch(self)
        self.role = W.Dropdown(options=ROLE_CHOICES, value="viewer", description="Role")
        self.expires = W.DatePicker(description="Expires", tooltip="optional: the grant ends after this day")
        self.grant_button = W.Button(description="Grant role", button_style="primary", icon="user-plus")
        self.refresh_button = W.Button(description="Refresh", icon="refresh")
        self.grant_button.on_click(lambda _b: self.grant())
        self.refresh_button.on_click(lambda _b: self.refresh())
        #: revoke buttons by (user, role), for notebooks and tests
        self.revoke_buttons: dict[tuple[str, str], W.Button] = {}
        self.children = [
            W.HTML(STYLE), self.header, self.table,
            W.HTML("<b>Add a member</b>"), self.people,
            W.HBox([self.role, self.expires, self.grant_button]),
            W.HBox([self.refresh_button, self.status]),
        ]
        self.refresh()

    @property
    def _base(self) -> str:
        return f"/experiments/{quote(self.exid, safe='')}"

    # ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Load the experiment and its members again."""
        detail = self.request("GET", self._base)
        if detail is None:
            self.header.value = f"<h3>Roles of {esc(self.exid)}</h3>"
            self._show([])
            return
        self.header.value = (f"<h3>Roles of {esc(self.exid)}</h3><div>{esc(detail.get('title'))}"
                             f" &middot; {'proprietary' if detail.get('proprietary') else 'not proprietary'}"
                             f" &middot; PI-owned by {esc(detail.get('institution'))}</div>")
        found = self.request("GET", self._base + "/roles")
        if found is not None:
            self._show(found["members"])

    def _show(self, members: list[dict]) -> None:
        self.members = members
        self.revoke_buttons = {}
        show_email = any("email" in m for m in members)
        cells: list[W.Widget] = [W.HTML(f"<b>{h}</b>") for h in
                                 ("Name", "Institution", "Role", "Access", "")]
        for m in members:
            who = esc(m.get("display_name") or m["name"])
            if show_email and m.get("email"):
                who += f' <span class="lv-muted">&lt;{esc(m["email"])}&gt;</span>'
            cells += [W.HTML(who), W.HTML(esc(m.get("institution") or "-")),
                      W.HTML(esc(m["role"].replace("_", " "))), W.HTML(self._access(m))]
            if m["role"] == "pi":
                cells.append(W.HTML('<span class="lv-muted">owner</span>'))
            else:
                b = W.Button(description="Revoke", button_style="warning", icon="user-times",
                             tooltip=f"revoke the {m['role']} role of {m['name']}",
                             layout=W.Layout(width="8em"))
                b.on_click(lambda _b, user=m["name"], role=m["role"]: self.revoke(user, role))
                self.revoke_buttons[(m["name"], m["role"])] = b
                cells.append(b)
        self.table.children = cells

    @staticmethod
    def _access(m: dict) -> str:
        if m["role"] == "facility_staff":
            ends = parse_time(m.get("access_ends"))
            if ends is None:
                return "until 30 days after the experiment ends (no end date yet)"
            state = "active" if m.get("active", True) else "<b>ended</b>"
            return f"{state}; access ends {esc(day(ends))}"
        if m.get("expires_at"):
            return f"until {esc(day(m['expires_at']))}"
        return "since " + esc(day(m.get("granted_at"))) if m.get("granted_at") else "-"

    # ------------------------------------------------------------------------------------
    def grant(self) -> bool:
        """Grant the chosen role to the person chosen in the search."""
        user = self.people.user
        if not user:
            self.status.problem("search for a person and choose them first")
            return False
        body = {"user": user, "role": self.role.value}
        if self.expires.value:
            body["expires_at"] = end_of_day(self.expires.value).isoformat()
        found = self.request("POST", self._base + "/roles", body,
                             ok=f"{user} is now {self.role.value.replace('_', ' ')} of {self.exid}")
        if found is None:
            return False
        self._show(found["members"])
        return True

    def revoke(self, user: str, role: str | None = None) -> bool:
        """Revoke ``user``'s ``role`` (all their roles when ``role`` is None); history is kept."""
        q = f"?role={quote(role)}" if role else ""
        done = self.request("DELETE", f"{self._base}/roles/{quote(user, safe='')}{q}",
                            ok=f"revoked {role.replace('_', ' ') if role else 'the roles'} of {user}")
        if done is None:
            return False
        message = self.status.value
        self.refresh()
        if self.last_error is None:
            self.status.value = message
        return True
