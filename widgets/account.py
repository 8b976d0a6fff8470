"""``MyAccount()``: my profile, my access log, export of my data, closing my account.

Closing explains first what is kept (privacy statement): the history of roles I held and the
activity logs of those roles, descriptive metadata of experiments (author names included),
and the audit events; personal data is anonymised one year after closing.
"""

from __future__ import annotations

import json
import os

import ipywidgets as W
from traitlets import Unicode

from labvault.datastore.client import Client

from .common import STYLE, LabvaultWidget, day, download_link, esc, table

CLOSING = """<b>Close my account</b>
<ul>
<li>Irreversible. You can no longer sign in, and your roles in experiments end at once.</li>
<li>What is <b>kept</b>: the history of the roles you held and their activity logs (scientific
integrity), descriptive metadata of experiments including author names (needed for publication),
and the audit log, which cannot be changed.</li>
<li>Your other personal data is anonymised one year after closing. Export it first if you want a copy.</li>
</ul>"""


class MyAccount(LabvaultWidget):
    """My profile, my own access log, "export my data", "close my account"."""

    export_dir = Unicode("", help="""Where "Export my data" writes its JSON file (default: the
        notebook's working directory). A download link is shown as well.""")

    def __init__(self, *, client: Client | None = None, **kwargs):
        super().__init__(client=client, **kwargs)
        self.me: dict = {}
        self.exported: dict | None = None
        self.closed: dict | None = None
        self.profile = W.HTML()
        self.access_log = W.HTML()
        self.export_button = W.Button(description="Export my data", icon="download")
        self.export_button.on_click(lambda _b: self.export())
        self.download = W.HTML()
        self.log_button = W.Button(description="My access log", icon="list")
        self.log_button.on_click(lambda _b: self.show_access_log())
        self.confirm = W.Text(placeholder="type your user name", description="Confirm")
        self.understood = W.Checkbox(value=False, description="I understand this cannot be undone")
        self.close_button = W.Button(description="Close my account", button_style="danger", icon="user-times",
                                     disabled=True)
        self.close_button.on_click(lambda _b: self.close_account())
        self.confirm.observe(self._arm, names="value")
        self.understood.observe(self._arm, names="value")
        self.children = [
            W.HTML(STYLE), W.HTML("<h3>My account</h3>"), self.profile,
            W.HBox([self.export_button, self.log_button]), self.download, self.access_log,
            W.HTML(CLOSING), W.HBox([self.confirm, self.understood, self.close_button]),
            self.status,
        ]
        self.refresh()

    def refresh(self) -> None:
        me = self.request("GET", "/me")
        if me is None:
            return
        self.me = me
        rows = [["Name", me.get("display_name") or me["name"]], ["User name", me["name"]],
                ["Institution", me.get("institution") or "-"],
                ["E-mail", (me.get("email") or "-") + ("" if me.get("email_visible") else " (private: not shown to others)")],
                ["ORCID", me.get("orcid") or "-"], ["State", me.get("state")],
                ["Member since", day(me.get("created_at"))], ["Last sign-in", day(me.get("last_login_at"))]]
        self.profile.value = table(["", ""], rows)

    def _arm(self, _change) -> None:
        self.close_button.disabled = not (self.understood.value and self.confirm.value.strip() == self.me.get("name"))

    def export(self) -> str | None:
        """Everything labvault holds about me, as JSON; returns the file it was written to."""
        data = self.request("GET", "/me/export")
        if data is None:
            return None
        self.exported = data
        raw = json.dumps(data, indent=2, ensure_ascii=False).encode()
        name = f"labvault-export-{self.me.get('name', 'me')}.json"
        path = os.path.join(self.export_dir or os.getcwd(), name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # personal data: mine only
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        self.download.value = download_link(raw, name, "application/json", f"download {name}")
        self.status.ok(f"your data ({len(data.get('roles', []))} roles, {len(data.get('activity', []))} "
                       f"events) was written to {path}")
        return path

    def show_access_log(self, limit: int = 50) -> list[dict]:
        found = self.request("GET", f"/me/access-log?limit={int(limit)}")
        events = found["events"] if found else []
        self.access_log.value = table(
            ["Time (UTC)", "Action", "Target", "Decision", "Reason"],
            [[e["time"][:19].replace("T", " "), e["action"], e["target"],
              "allowed" if e["allowed"] else "refused", e["reason"]] for e in events],
            empty="nothing recorded yet") if found else ""
        return events

    def close_account(self) -> bool:
        """Close my account once my user name was typed and the box ticked."""
        name = self.confirm.value.strip()
        if not self.understood.value or name != self.me.get("name"):
            self.status.problem("tick the box and type your user name to close your account")
            return False
        done = self.request("POST", "/me/close", {"confirm": name})
        if done is None:
            return False
        self.closed = done
        kept = "".join(f"<li>{esc(k)}</li>" for k in done.get("kept", []))
        self.status.value = f'<span class="lv-ok">Your account is closed. Kept:</span><ul>{kept}</ul>'
        self.close_button.disabled = True
        return True
