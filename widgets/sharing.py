"""``SharingPanel(exid)``: share an experiment with people; confirm requests from outside.

Inside the experiment's institution a share takes effect at once; with someone outside it, it
waits, "pending PI confirmation", until the PI confirms or refuses it here.
"""

from __future__ import annotations

from urllib.parse import quote

import ipywidgets as W

from labvault.datastore.client import Client

from .common import STYLE, LabvaultWidget, PeopleSearch, day, esc, person, table

STATE_TEXT = {"pending": "pending PI confirmation", "confirmed": "in effect", "refused": "refused by the PI"}


class SharingPanel(LabvaultWidget):
    """Share experiment ``exid``; its PI also sees and decides the pending requests."""

    def __init__(self, exid: str, *, client: Client | None = None, **kwargs):
        super().__init__(client=client, **kwargs)
        self.exid = exid
        self.shares: list[dict] = []
        self.pending: list[dict] = []
        self.header = W.HTML(f"<h3>Sharing {esc(exid)}</h3>")
        self.people = PeopleSearch(self)
        self.role = W.Dropdown(options=[("viewer: reads the data", "viewer"),
                                        ("writer: reads and adds data", "writer")],
                               value="viewer", description="As")
        self.share_button = W.Button(description="Share", button_style="primary", icon="share-alt")
        self.share_button.on_click(lambda _b: self.share())
        self.shares_html = W.HTML()
        self.pending_box = W.VBox()
        #: confirm / refuse buttons by share id
        self.confirm_buttons: dict[int, W.Button] = {}
        self.refuse_buttons: dict[int, W.Button] = {}
        self.refresh_button = W.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.children = [
            W.HTML(STYLE), self.header,
            W.HTML('<span class="lv-muted">Inside the institution a share takes effect at once; '
                   "outside it, the PI confirms it first.</span>"),
            self.people, W.HBox([self.role, self.share_button]),
            W.HTML("<b>Requests waiting for the PI</b>"), self.pending_box,
            W.HTML("<b>Shares</b>"), self.shares_html,
            W.HBox([self.refresh_button, self.status]),
        ]
        self.refresh()

    @property
    def _base(self) -> str:
        return f"/experiments/{quote(self.exid, safe='')}"

    def refresh(self) -> None:
        found = self.request("GET", self._base + "/shares")
        if found is not None:
            self.shares = found["shares"]
            self.shares_html.value = table(
                ["With", "As", "State", "Requested by", "Decided"],
                [[person(x["user"]), x["role"], STATE_TEXT.get(x["state"], x["state"]),
                  person(x["requested_by"]), day(x.get("decided_at"))] for x in self.shares],
                empty="not shared with anyone yet")
        pending = self.call(self.client.request, "GET", "/shares/pending")
        self.pending = [x for x in (pending or {}).get("shares", []) if x["exid"] == self.exid]
        self._show_pending()

    def _show_pending(self) -> None:
        self.confirm_buttons, self.refuse_buttons = {}, {}
        rows: list[W.Widget] = []
        for x in self.pending:
            yes = W.Button(description="Confirm", button_style="success", icon="check",
                           layout=W.Layout(width="8em"))
            no = W.Button(description="Refuse", button_style="danger", icon="times",
                          layout=W.Layout(width="8em"))
            yes.on_click(lambda _b, i=x["id"]: self.decide(i, True))
            no.on_click(lambda _b, i=x["id"]: self.decide(i, False))
            self.confirm_buttons[x["id"]], self.refuse_buttons[x["id"]] = yes, no
            text = (f"{esc(person(x['requested_by']))} asks to share with "
                    f"<b>{esc(person(x['user']))}</b> as {esc(x['role'])} (outside the institution)")
            rows.append(W.HBox([W.HTML(text), yes, no]))
        self.pending_box.children = rows or [W.HTML('<span class="lv-muted">none</span>')]

    def share(self) -> dict | None:
        """Share with the person chosen in the search; returns the share (its ``state``)."""
        user = self.people.user
        if not user:
            self.status.problem("search for a person and choose them first")
            return None
        x = self.request("POST", self._base + "/shares", {"user": user, "role": self.role.value})
        if x is None:
            return None
        self.refresh()
        if x["state"] == "pending":
            self.status.ok(f"{person(x['user'])}: pending PI confirmation (outside the institution)")
        else:
            self.status.ok(f"shared with {person(x['user'])} as {x['role']}: in effect now")
        return x

    def decide(self, share_id: int, confirm: bool) -> bool:
        """The PI confirms (grants the role) or refuses a pending request."""
        verb = "confirm" if confirm else "refuse"
        x = self.request("POST", f"/shares/{int(share_id)}/{verb}")
        if x is None:
            return False
        self.refresh()
        self.status.ok(f"{'confirmed' if confirm else 'refused'}: {person(x['user'])} as {x['role']}")
        return True
