"""``RetentionPanel(exid)``: how long an experiment's data is kept; extend, archive, delete.

Days are counted on the service's clock (the one the lifecycle job deletes by). Only the PI
extends, archives or deletes (retention.pi_only); deleting needs the exID typed again and
crypto-shreds every file, keeping the metadata stub and the audit trail.
"""

from __future__ import annotations

from urllib.parse import quote

import ipywidgets as W
from traitlets import Integer

from labvault.datastore.client import Client

from .common import STYLE, LabvaultWidget, day, end_of_day, esc, parse_time


class RetentionPanel(LabvaultWidget):
    """Retain-until date and days left of experiment ``exid``; extend, archive, delete (PI)."""

    warning_days = Integer(30, help="""Warn when the data will be deleted within this many days.

        Once the retain-until date has passed and nobody extended it, the lifecycle job deletes
        the data permanently; the panel shows a warning from this many days before.""")

    def __init__(self, exid: str, *, client: Client | None = None, **kwargs):
        super().__init__(client=client, **kwargs)
        self.exid = exid
        self.info: dict = {}
        self.header = W.HTML()
        self.summary = W.HTML()
        self.warning = W.HTML()
        self.until = W.DatePicker(description="Keep until")
        self.extend_button = W.Button(description="Extend", button_style="primary", icon="calendar-plus-o")
        self.archive_button = W.Button(description="Archive", icon="archive",
                                       tooltip="archive: kept at least the minimum period from now")
        self.confirm = W.Text(placeholder=f"type {exid} to confirm", description="Confirm",
                              continuous_update=True)
        self.reason = W.Text(placeholder="why (shown to whoever tries to read it)", description="Reason")
        self.delete_button = W.Button(description="Delete permanently", button_style="danger",
                                      icon="trash", disabled=True)
        self.extend_button.on_click(lambda _b: self.extend())
        self.archive_button.on_click(lambda _b: self.archive())
        self.delete_button.on_click(lambda _b: self.delete())
        self.confirm.observe(self._on_confirm, names="value")
        self.refresh_button = W.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.children = [
            W.HTML(STYLE), self.header, self.summary, self.warning,
            W.HBox([self.until, self.extend_button, self.archive_button]),
            W.HTML("<b>Delete</b> <span class='lv-muted'>every file is destroyed on every replica; "
                   "the experiment's description and its audit trail stay.</span>"),
            W.HBox([self.confirm, self.reason, self.delete_button]),
            W.HBox([self.refresh_button, self.status]),
        ]
        self.refresh()

    @property
    def _base(self) -> str:
        return f"/experiments/{quote(self.exid, safe='')}"

    def _on_confirm(self, change) -> None:
        self.delete_button.disabled = change["new"].strip() != self.exid

    # ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        info = self.request("GET", self._base + "/retention/status")
        self.header.value = f"<h3>Retention of {esc(self.exid)}</h3>"
        if info is None:
            self.summary.value = self.warning.value = ""
            return
        self._show(info)

    def _show(self, info: dict) -> None:
        self.info = info
        self.header.value = f"<h3>Retention of {esc(self.exid)}</h3><div>{esc(info.get('title'))}</div>"
        left = info.get("days_left")
        if info.get("deleted_at"):
            text = f"<b>Deleted</b> on {esc(day(info['deleted_at']))}."
        elif info.get("retain_until"):
            text = (f"Kept until <b>{esc(day(info['retain_until']))}</b> "
                    f"({left} day{'s' if left != 1 else ''} left)")
        else:
            text = "Not archived: no deletion date yet (archiving starts the retention period)."
        if info.get("archived_at"):
            text += f"; archived on {esc(day(info['archived_at']))}"
        text += (f'<br><span class="lv-muted">{info.get("live_files", 0)} file(s). Archived data is kept at least '
                 f'{info.get("minimum_days")} days: an extension may choose '
                 f'{esc(day(info.get("minimum_retain_until")))} or later.</span>')
        manage = info.get("manage") or {}
        if not manage.get("allowed"):
            text += (f'<br><span class="lv-muted">You cannot change this: {esc(manage.get("reason"))} '
                     f'<code>{esc(manage.get("rule"))}</code></span>')
        self.summary.value = text
        if left is not None and not info.get("deleted_at") and left <= self.warning_days:
            self.warning.value = (f'<div class="lv-warn"><b>Warning:</b> the data of {esc(self.exid)} will be '
                                  f"permanently deleted in {max(left, 0)} day{'s' if left != 1 else ''} "
                                  f"({esc(day(info['retain_until']))}) unless its PI extends it.</div>")
        else:
            self.warning.value = ""
        floor = parse_time(info.get("minimum_retain_until"))
        current = parse_time(info.get("retain_until"))
        known = [t for t in (floor, current) if t is not None]
        if known and self.until.value is None:  # a start for the date picker: the later of the two
            self.until.value = max(known).date()

    @property
    def in_warning(self) -> bool:
        """True while the panel warns that deletion is near."""
        return bool(self.warning.value)

    # ------------------------------------------------------------------------------------
    def extend(self) -> bool:
        """Keep the data until the end of the chosen day (PI only; at least the minimum)."""
        if self.until.value is None:
            self.status.problem("choose a date first")
            return False
        until = end_of_day(self.until.value)
        info = self.request("POST", self._base + "/retention", {"retain_until": until.isoformat()},
                            ok=f"{self.exid} is kept until {day(until)}")
        if info is None:
            return False
        self._refresh_keeping_status()
        return True

    def archive(self) -> bool:
        info = self.request("POST", self._base + "/archive")
        if info is None:
            return False
        self.status.ok(f"archived; kept until {day(info['retain_until'])}")
        self._refresh_keeping_status()
        return True

    def delete(self) -> bool:
        """Delete the experiment permanently once its exID was typed in ``confirm``."""
        if self.confirm.value.strip() != self.exid:
            self.status.problem(f"type {self.exid} in the confirmation box to delete it")
            return False
        body = {"confirm": self.confirm.value.strip(), "reason": self.reason.value.strip()}
        info = self.request("POST", self._base + "/delete", body)
        if info is None:
            return False
        self.confirm.value = ""
        self.status.ok(f"{self.exid} was deleted: {info['files_deleted']} file(s) destroyed on every replica")
        self._show({**self.info, **info, "retain_until": None, "days_left": None, "live_files": 0})
        return True

    def _refresh_keeping_status(self) -> None:
        message = self.status.value
        self.refresh()
        if self.last_error is None:
            self.status.value = message
