"""What the labvault widgets share: the client they talk through, the inline status line that
shows a refusal's reason, people search, and small HTML helpers (every value escaped)."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from datetime import date, datetime, timezone
from typing import Any

import ipywidgets as W
import urllib3

from labvault.datastore.client import Client, LabvaultError

STYLE = """<style>
.lv-table { border-collapse: collapse; font-size: 0.9em; }
.lv-table th, .lv-table td { border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: left; }
.lv-refused { color: #b00020; }
.lv-ok { color: #1b5e20; }
.lv-warn { background: #fff3cd; border-left: 4px solid #e0a800; padding: 4px 8px; }
.lv-muted { color: #666; }
</style>"""


def esc(value: Any) -> str:
    """HTML-escape anything shown in a widget: titles and names come from other users."""
    return html.escape("" if value is None else str(value), quote=True)


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def day(value: str | datetime | None) -> str:
    """``2026-06-01`` from an ISO time (or ``-``)."""
    t = parse_time(value) if isinstance(value, str) else value
    return t.strftime("%Y-%m-%d") if t else "-"


def end_of_day(d: date) -> datetime:
    """A picked day means "until that day is over" (UTC)."""
    return datetime(d.year, d.month, d.day, 23, 59, 59, tzinfo=timezone.utc)


def person(p: dict | None) -> str:
    """Name and institution: all other users see of a person (privacy.identity)."""
    if not p:
        return "-"
    name = p.get("display_name") or p.get("name", "?")
    inst = p.get("institution")
    return f"{name} ({inst})" if inst else name


def table(headers: list[str], rows: list[list[Any]], empty: str = "nothing to show") -> str:
    if not rows:
        return f'<span class="lv-muted">{esc(empty)}</span>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="lv-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def download_link(data: bytes, filename: str, mime: str, label: str) -> str:
    """A link the browser saves as ``filename`` (the data travels inside the page)."""
    b64 = base64.b64encode(data).decode()
    return (f'<a download="{esc(filename)}" href="data:{esc(mime)};base64,{b64}" '
            f'target="_blank">{esc(label)}</a>')


class Status(W.HTML):
    """One line under a widget: what just happened, or why the service refused it."""

    def ok(self, message: str) -> None:
        self.value = f'<span class="lv-ok">{esc(message)}</span>'

    def info(self, message: str) -> None:
        self.value = f'<span class="lv-muted">{esc(message)}</span>'

    def refused(self, error: LabvaultError) -> None:
        rule = f" <code>{esc(error.rule)}</code>" if error.rule else ""
        what = "Refused" if error.status in (401, 403, 404, 410, 429) else "Not done"
        self.value = f'<span class="lv-refused">{what}: {esc(error.reason or error.error)}{rule}</span>'

    def problem(self, message: str) -> None:
        self.value = f'<span class="lv-refused">{esc(message)}</span>'


class LabvaultWidget(W.VBox):
    """Base of the labvault widgets: holds the client (the user's token, nothing else that
    grants access) and a status line; :meth:`call` runs one request and shows a refusal's
    reason inline instead of raising."""

    def __init__(self, client: Client | None = None, **kwargs):
        super().__init__(**kwargs)
        self.client = client if client is not None else Client()
        self.status = Status()
        #: the last refusal or failure (``None`` after a success), for notebooks and tests
        self.last_error: LabvaultError | None = None

    def call(self, fn: Callable[..., Any], *args, ok: str | None = None, **kwargs) -> Any:
        """``fn(*args, **kwargs)``; on a :class:`LabvaultError` show it and return ``None``."""
        try:
            result = fn(*args, **kwargs)
        except LabvaultError as e:
            self.last_error = e
            self.status.refused(e)
            return None
        except (OSError, urllib3.exceptions.HTTPError) as e:  # unreachable: say so, no traceback
            self.last_error = LabvaultError(0, "unavailable", "", f"the datastore service did not answer: {e}")
            self.status.refused(self.last_error)
            return None
        self.last_error = None
        if ok:
            self.status.ok(ok)
        return result

    def request(self, method: str, path: str, body: Any = None, ok: str | None = None) -> Any:
        return self.call(self.client.request, method, path, body, ok=ok)


class PeopleSearch(W.HBox):
    """Find a person by name: shows name and institution only (the service decides what else)."""

    def __init__(self, owner: LabvaultWidget, placeholder: str = "search a name (2+ letters)"):
        super().__init__()
        self.owner = owner
        self.query = W.Text(placeholder=placeholder, continuous_update=False,
                            layout=W.Layout(width="16em"))
        self.search_button = W.Button(description="Search", icon="search", layout=W.Layout(width="7em"))
        self.results = W.Dropdown(options=[], description="Person", layout=W.Layout(width="24em"))
        self.query.observe(self._on_query, names="value")
        self.search_button.on_click(lambda _b: self.search())
        self.children = [self.query, self.search_button, self.results]

    def _on_query(self, change) -> None:
        if len((change["new"] or "").strip()) >= 2:
            self.search()

    def search(self) -> list[dict]:
        from urllib.parse import quote

        q = self.query.value.strip()
        if len(q) < 2:
            self.owner.status.info("type at least 2 letters of a name")
            return []
        found = self.owner.request("GET", f"/users?q={quote(q)}")
        people = found["users"] if found else []
        self.results.options = [(person(u), u["name"]) for u in people]
        self.results.value = people[0]["name"] if people else None
        if found is not None:
            self.owner.status.info(f"{len(people)} found" if people else f"nobody found for {q!r}")
        return people

    @property
    def user(self) -> str | None:
        """The chosen user's name (``None`` when nobody is chosen)."""
        return self.results.value
