"""Hub logs without full client IPs (privacy statement: access logs mask the last two bytes).

(Named logs, not logging: a module named logging next to a script would shadow the standard one.)

JupyterHub's request log (``jupyterhub.log.log_request``) and Tornado's warnings for HTTP
errors print the client's full address. :func:`log_request` logs like JupyterHub's but with
:func:`labvault.policies.truncate_ip`; :class:`MaskIPFilter` masks addresses in Tornado's own
log lines. Use them in ``jupyterhub_config.py``::

    from labvault.hub.logs import log_request, mask_tornado_logs
    c.JupyterHub.tornado_settings = {"log_function": log_request}
    mask_tornado_logs()

(The labvault authenticators do both by default: ``mask_ips_in_logs``.)
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from functools import partial

from tornado.log import access_log
from tornado.web import RequestHandler, StaticFileHandler

from labvault.policies import truncate_ip

#: headers that carry client addresses (dumped by JupyterHub for 5xx answers)
ADDRESS_HEADERS = ("X-Forwarded-For", "X-Real-Ip", "X-Real-IP", "Forwarded", "X-Client-Ip")

_IPV4 = re.compile(r"(?<![\w.])(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})(?![\w.])")
_IPV6 = re.compile(r"(?<![\w:])([0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:%\w+)?)(?![\w:])")


_SUMMARY = re.compile(r"\(([0-9A-Fa-f.:%\w]+)\)")


def mask_ips(text: str, v4_masked_bytes: int = 2, v6_prefix_bits: int = 48) -> str:
    """Every IPv4/IPv6 address in ``text``, truncated as in access logs."""

    def sub(m: re.Match) -> str:
        value = m.group(1)
        try:
            ipaddress.ip_address(value.split("%", 1)[0])
        except ValueError:
            return value
        return truncate_ip(value, v4_masked_bytes, v6_prefix_bits)

    return _IPV6.sub(sub, _IPV4.sub(sub, text))


def _scrub_headers(headers) -> dict:
    from jupyterhub.log import _scrub_headers as hub_scrub

    scrubbed = hub_scrub(headers)
    for name in list(scrubbed):
        if name.title() in {h.title() for h in ADDRESS_HEADERS}:
            scrubbed[name] = mask_ips(str(scrubbed[name]))
    return scrubbed


def log_request(handler: RequestHandler) -> None:
    """JupyterHub's request log line, with the client address truncated (192.168.x.x).

    Same levels and format as ``jupyterhub.log.log_request`` (static files and 304s at debug,
    4xx warning, 5xx error; redirect targets; request headers for 5xx, with address headers
    masked) and the same Prometheus metrics.
    """
    from jupyterhub.handlers.pages import HealthCheckHandler
    from jupyterhub.log import _scrub_uri
    from jupyterhub.metrics import prometheus_log_method

    status = handler.get_status()
    request = handler.request
    if status == 304 or (status < 300 and isinstance(handler, StaticFileHandler | HealthCheckHandler)):
        level = logging.DEBUG
    elif status < 400:
        level = logging.INFO
    elif status < 500:
        level = logging.WARNING
    else:
        level = logging.ERROR
    request_time = 1000.0 * request.request_time()
    if request_time >= 1000 and level < logging.INFO:
        level = logging.INFO
    log = partial(access_log.log, level)
    try:
        user = handler.current_user
    except Exception:  # noqa: BLE001 - an unresolvable user is logged as none
        user = None
    if user is None:
        username = ""
    elif isinstance(user, str):
        username = user
    elif isinstance(user, dict):
        username = user.get("name", "")
    else:
        username = getattr(user, "name", "")
    location = ""
    if status >= 500 and status not in {502, 503}:
        log(json.dumps(_scrub_headers(request.headers), indent=2))
    elif status in {301, 302}:
        target = handler._headers.get("Location")  # tornado has no public getter
        if target:
            location = f" -> {_scrub_uri(target)}"
    log(f"{status} {request.method} {_scrub_uri(request.uri)}{location} "
        f"({username}@{truncate_ip(request.remote_ip)}) {request_time:.2f}ms")
    prometheus_log_method(handler)


def mask_request_summaries(text: str) -> str:
    """Addresses in parentheses, where Tornado puts the client's ("GET /hub/ (1.2.3.4)");
    other addresses (e.g. a server's in a URL) are left alone."""

    def sub(m: re.Match) -> str:
        value = m.group(1)
        try:
            ipaddress.ip_address(value.split("%", 1)[0])
        except ValueError:
            return m.group(0)
        return f"({truncate_ip(value)})"

    return _SUMMARY.sub(sub, text)


class MaskIPFilter(logging.Filter):
    """Masks client addresses in log records (Tornado's "403 POST /hub/login (1.2.3.4): …")."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is left for logging to report
            return True
        masked = mask_request_summaries(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


#: tornado.access is JupyterHub's request log, which log_request writes already masked
TORNADO_LOGGERS = ("tornado.general", "tornado.application")


def mask_tornado_logs() -> None:
    """Install :class:`MaskIPFilter` on Tornado's loggers (once)."""
    for name in TORNADO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, MaskIPFilter) for f in logger.filters):
            logger.addFilter(MaskIPFilter())
