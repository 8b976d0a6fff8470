"""``AuditTrail(exid)``: the experiment's audit events as a filterable table, CSV export, and
a "verify chain" button that has the service recompute the hash chain.

The full trail (reads and refusals included) is for the PI and admins (audit.full_trail);
other participants see the experiment's activity log (privacy.activity_log) instead.
"""

from __future__ import annotations

import csv
import io
import os
from datetime import datetime, timezone
from urllib.parse import quote

import ipywidgets as W
from traitlets import Integer, Unicode

from labvault.datastore.client import Client

from .common import STYLE, LabvaultWidget, download_link, esc, table

ALL = "(all)"
COLUMNS = ["seq", "time", "actor", "action", "target", "allowed", "rule", "reason", "ip"]


def _cell(value) -> str:
    """A CSV cell that a spreadsheet will not run as a formula (reasons come from users)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class AuditTrail(LabvaultWidget):
    """Audit events of experiment ``exid``: filter, export as CSV, verify the chain."""

    export_dir = Unicode("", help="""Where "Export CSV" writes its file (default: the notebook's
        working directory). A download link is shown as well.""")
    max_rows = Integer(200, help="Rows shown in the table at once (the filters narrow them down; "
                                 "the CSV export has every matching event).")

    def __init__(self, exid: str, *, client: Client | None = None, **kwargs):
        super().__init__(client=client, **kwargs)
        self.exid = exid
        self.events: list[dict] = []
        self.full = True
        self.header = W.HTML()
        self.actor = W.Dropdown(options=[ALL], value=ALL, description="Who")
        self.action = W.Dropdown(options=[ALL], value=ALL, description="Action")
        self.decision = W.ToggleButtons(options=["all", "allowed", "refused"], value="all")
        self.text = W.Text(placeholder="search target, rule or reason", continuous_update=False)
        for w in (self.actor, self.action, self.decision, self.text):
            w.observe(self._on_filter, names="value")
        self.table = W.HTML()
        self.export_button = W.Button(description="Export CSV", icon="download")
        self.verify_button = W.Button(description="Verify chain", icon="shield")
        self.refresh_button = W.Button(description="Refresh", icon="refresh")
        self.export_button.on_click(lambda _b: self.export_csv())
        self.verify_button.on_click(lambda _b: self.verify())
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.verify_result = W.HTML()
        self.download = W.HTML()
        #: the last chain report from the service
        self.chain: dict | None = None
        self.children = [
            W.HTML(STYLE), self.header,
            W.HBox([self.actor, self.action]), W.HBox([self.decision, self.text]),
            self.table,
            W.HBox([self.refresh_button, self.export_button, self.verify_button]),
            self.download, self.verify_result, self.status,
        ]
        self.refresh()

    @property
    def _base(self) -> str:
        return f"/experiments/{quote(self.exid, safe='')}"

    def refresh(self) -> None:
        self.full = True
        found = self.request("GET", self._base + "/audit")
        if found is None and self.last_error is not None and self.last_error.rule == "audit.full_trail":
            refusal = self.last_error
            found = self.request("GET", self._base + "/activity")
            if found is not None:
                self.full = False
                self.status.info(f"{refusal.reason}: showing the activity log (changes only)")
        self.events = found["events"] if found else []
        kind = "Audit trail" if self.full else "Activity log"
        self.header.value = f"<h3>{kind} of {esc(self.exid)}</h3>"
        self._set_options(self.actor, sorted({e["actor"] for e in self.events}))
        self._set_options(self.action, sorted({e["action"] for e in self.events}))
        self._render()

    @staticmethod
    def _set_options(dropdown: W.Dropdown, values: list[str]) -> None:
        keep = dropdown.value if dropdown.value in values else ALL
        dropdown.options = [ALL, *values]
        dropdown.value = keep

    def _on_filter(self, _change) -> None:
        self._render()

    # ------------------------------------------------------------------------------------
    def filtered(self) -> list[dict]:
        """The events that pass the filters, newest first."""
        text = self.text.value.strip().lower()
        out = []
        for e in self.events:
            if self.actor.value != ALL and e["actor"] != self.actor.value:
                continue
            if self.action.value != ALL and e["action"] != self.action.value:
                continue
            if self.decision.value == "allowed" and not e["allowed"]:
                continue
            if self.decision.value == "refused" and e["allowed"]:
                continue
            if text and text not in f"{e['target']} {e['rule']} {e['reason']}".lower():
                continue
            out.append(e)
        return out

    def _render(self) -> None:
        rows = self.filtered()
        shown = rows[: self.max_rows]
        html = table(["#", "Time (UTC)", "Who", "Action", "Target", "Decision", "Rule", "Reason"],
                     [[e["seq"], e["time"][:19].replace("T", " "), e["actor"], e["action"], e["target"],
                       "allowed" if e["allowed"] else "REFUSED", e["rule"], e["reason"]] for e in shown],
                     empty="no events match")
        note = (f'<div class="lv-muted">{len(rows)} of {len(self.events)} events'
                + (f", the first {self.max_rows} shown" if len(rows) > len(shown) else "") + "</div>")
        self.table.value = note + html

    def csv(self) -> str:
        """The filtered events as CSV text."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(COLUMNS)
        for e in self.filtered():
            w.writerow([_cell(e.get(c, "")) for c in COLUMNS])
        return buf.getvalue()

    def export_csv(self) -> str:
        """Write the filtered events to a CSV file; returns its path (also offered as a download)."""
        data = self.csv().encode()
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        name = f"audit-{self.exid}-{stamp}.csv".replace("/", "_")
        path = os.path.join(self.export_dir or os.getcwd(), name)
        with open(path, "wb") as f:
            f.write(data)
        self.download.value = download_link(data, name, "text/csv", f"download {name}")
        self.status.ok(f"{len(self.filtered())} events written to {path}")
        return path

    def verify(self) -> dict | None:
        """Ask the service to recompute the audit hash chain."""
        report = self.request("GET", self._base + "/audit/verify")
        self.chain = report
        if report is None:
            self.verify_result.value = ""
            return None
        if report["ok"]:
            self.verify_result.value = (
                f'<span class="lv-ok">&#10004; The audit chain is intact: {report["events"]} events verified, '
                f'{report["experiment_events"]} of them about {esc(self.exid)}.</span>')
        else:
            self.verify_result.value = (
                f'<span class="lv-refused">&#10008; The audit chain is BROKEN at event '
                f'{esc(report["first_broken"])}: {esc(report["problem"])}. Tell your administrator.</span>')
        return report
