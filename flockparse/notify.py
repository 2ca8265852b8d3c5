"""Where alerts go: a webhook (JSON POST: plain `json`, `slack` or `discord` bodies) and/or e-mail (SMTP with
STARTTLS, TLS or none, and login). One `send` is one attempt within a total deadline; retries, back-off and
threads are the caller's (flockparse/alerts.py).

Safety, as for nodes: the webhook goes through the node transport (flockparse/transport.py: a total deadline
on the whole call, the reply read up to a cap, redirects never followed); SMTP gets a watchdog that shuts the
socket at the deadline and a cap on each reply. Certificates are verified. The webhook URL's path (Slack's
and Discord's carry a secret) never appears in an error or a log: `describe()` shows scheme, host and port.
Text that came from a node is sent as text: control characters escaped, Slack's `<>&` escaped, Discord told
to ping nobody. The SMTP password comes from an environment variable or a file, never the command line.
"""

from __future__ import annotations

import contextlib
import os
import smtplib
import socket
import ssl
import stat
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from flockparse.transport import NodeError, NodeTransport

WEBHOOK_FORMATS = ("json", "slack", "discord")
TLS_MODES = ("starttls", "tls", "none")
DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}
WEBHOOK_TIMEOUT_S = 10.0
EMAIL_TIMEOUT_S = 30.0
WEBHOOK_REPLY_MAX = 64 * 1024  # what is read of a receiver's reply
SMTP_REPLY_MAX = 64 * 1024  # one SMTP reply (all its lines) at most
DISCORD_MAX = 2000  # Discord refuses longer content
SLACK_MAX = 3000
SUBJECT_MAX = 160
RETRYABLE_STATUS = frozenset((408, 425, 429, 500, 502, 503, 504))


class AlertConfigError(ValueError):
    """An alert setting that cannot work (e.g. the password variable is not set); one line."""


@dataclass(frozen=True)
class Notice:
    """One message to send: a condition starting (firing), ending (resolved), or a test."""

    kind: str  # model_off_gpu | gpu_lost | node_down | move_failed | test
    state: str  # firing | resolved | test
    message: str
    node: str | None = None
    model: str | None = None
    time: float = field(default_factory=time.time)
    changes: int = 0  # changes not sent (cool-down) since the previous message about the same thing

    @property
    def text(self) -> str:
        """The one line people read: `[FIRING] ...`, plus the changes the cool-down held back."""
        extra = (
            f" ({self.changes} change(s) since the last message held back by the cool-down)"
            if self.changes
            else ""
        )
        return f"[{self.state.upper()}] {plain(self.message)}{extra}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": "flockparse",
            "host": socket.gethostname(),
            "kind": self.kind,
            "state": self.state,
            "node": self.node,
            "model": self.model,
            "message": plain(self.message),
            "changes": self.changes,
            "time": datetime.fromtimestamp(self.time, UTC).isoformat(timespec="seconds"),
        }


def plain(text: str) -> str:
    """Node text as plain text: control and bidi characters escaped (never a terminal or mail trick)."""
    out = []
    for char in str(text):
        if char == "\n" or not (unicodedata.category(char) in ("Cc", "Cf") or char == "\x7f"):
            out.append(char)
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(out)


@dataclass(frozen=True)
class SendResult:
    ok: bool
    error: str = ""
    retry: bool = True  # False: retrying cannot help (a 404 webhook, a refused login)
    retry_after: float | None = None  # the receiver asked to wait this long (HTTP 429 Retry-After)


class Channel(Protocol):
    name: str

    def describe(self) -> str: ...

    def send(self, notice: Notice) -> SendResult: ...


# ----------------------------------------------------------------------------------------- webhook
def webhook_body(notice: Notice, fmt: str) -> dict[str, Any]:
    """The JSON body for the receiver's format."""
    icon = {"firing": ":red_circle:", "resolved": ":large_green_circle:"}.get(
        notice.state, ":information_source:"
    )
    if fmt == "slack":  # an incoming webhook takes `text` (mrkdwn: <, > and & must be escaped)
        text = notice.text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return {"text": f"{icon} {text}"[:SLACK_MAX]}
    if fmt == "discord":  # `content`, at most 2000 characters; node text must never ping @everyone
        return {"content": f"{icon} {notice.text}"[:DISCORD_MAX], "allowed_mentions": {"parse": []}}
    return {**notice.as_dict(), "text": notice.text}


def check_webhook_url(url: str) -> str:
    """An http(s) URL with a host; a ValueError in one line otherwise (the path is not repeated)."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("webhook_url is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhook_url must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError(
            "webhook_url must not carry user:password@ (put the token in the path, as Slack does)"
        )
    return url.strip()


class WebhookChannel:
    """JSON POST to one URL; 2xx is delivered, 408/429/5xx and network errors are worth a retry."""

    name = "webhook"

    def __init__(self, url: str, fmt: str = "json", timeout: float = WEBHOOK_TIMEOUT_S) -> None:
        self.url, self.format, self.timeout = check_webhook_url(url), fmt, timeout
        parts = urlsplit(self.url)
        # the transport sends `prefix (the URL's path) + target`: a bare host needs "/", a query rides along
        self._base = f"{parts.scheme}://{parts.netloc}{parts.path}"
        self._target = "/" if parts.path in ("", "/") or parts.path.endswith("/") else ""
        self._target += f"?{parts.query}" if parts.query else ""
        secret = parts.path not in ("", "/") or parts.query
        self._shown = f"{parts.scheme}://{parts.netloc}/…" if secret else f"{parts.scheme}://{parts.netloc}"
        self._transport = NodeTransport(max_idle_per_node=1)

    def describe(self) -> str:
        return f"webhook ({self.format}) {self._shown}"

    def send(self, notice: Notice) -> SendResult:
        try:
            reply = self._transport.call(
                self._base, "POST", self._target, webhook_body(notice, self.format), timeout=self.timeout,
                max_bytes=WEBHOOK_REPLY_MAX,
            )  # fmt: skip
        except NodeError as exc:
            return SendResult(False, self._redact(exc.message))
        if 200 <= reply.status < 300:
            return SendResult(True)
        detail = plain(reply.text.strip()[:200]) or "no body"
        error = f"the receiver answered HTTP {reply.status}: {detail}"
        return SendResult(
            False,
            error,
            retry=reply.status in RETRYABLE_STATUS,
            retry_after=_retry_after(reply, reply.status),
        )

    def _redact(self, message: str) -> str:
        """The transport names the URL (and its secret path) in errors: show scheme://host:port/… only."""
        for secret in (self._base + self._target, self._base, self._target):
            if secret not in ("", "/"):
                message = message.replace(secret, self._shown)
        return " ".join(message.split())

    def close(self) -> None:
        self._transport.close()


def _retry_after(reply: Any, status: int) -> float | None:
    """Seconds from a 429/503's Retry-After (only the delta-seconds form is honoured)."""
    if status not in (429, 503) or not isinstance(reply.body, dict):
        value = None
    else:
        value = reply.body.get("retry_after")  # Slack and Discord also say it in the body
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------- e-mail
@dataclass(frozen=True)
class EmailSettings:
    host: str
    to: tuple[str, ...]
    sender: str  # the `from` key
    port: int | None = None  # None: 587 for starttls, 465 for tls, 25 for none
    tls: str = "starttls"
    user: str | None = None
    password_env: str | None = None
    password_file: str | None = None

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.tls]

    def password(self) -> str | None:
        """From the environment variable or the file (which must not be readable by others); None when
        no login is configured. AlertConfigError in one line when it cannot be had."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if not value:
                raise AlertConfigError(f"[alerts.email] password_env: ${self.password_env} is not set")
            return value
        if self.password_file:
            path = Path(self.password_file).expanduser()
            try:
                mode = path.stat().st_mode
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise AlertConfigError(
                    f"[alerts.email] password_file: cannot read {path} ({exc.strerror or exc})"
                ) from None
            if stat.S_IMODE(mode) & 0o077:
                raise AlertConfigError(
                    f"[alerts.email] password_file: {path} can be read by others (chmod 600 {path})"
                )
            return text.rstrip("\r\n")
        return None


class _CappedReader:
    """The SMTP reply stream with a byte budget per reply (smtplib caps a line, not how many there are)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.budget = SMTP_REPLY_MAX

    def readline(self, limit: int = -1) -> bytes:
        line = self._raw.readline(limit)
        self.budget -= len(line)
        if self.budget < 0:
            raise OSError(f"the server's reply is larger than {SMTP_REPLY_MAX // 1024} KiB")
        return line

    def close(self) -> None:
        self._raw.close()


class _Capped:
    sock: Any
    file: Any

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:
            self.file = _CappedReader(self.sock.makefile("rb"))
        if isinstance(self.file, _CappedReader):
            self.file.budget = SMTP_REPLY_MAX
        return super().getreply()  # type: ignore[misc]


class _SMTP(_Capped, smtplib.SMTP):
    pass


class _SMTPS(_Capped, smtplib.SMTP_SSL):
    pass


def _shut(client: smtplib.SMTP) -> None:
    """The watchdog: a read blocked past the deadline returns at once."""
    sock = client.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class EmailChannel:
    """One message per notice to every `to` address, over SMTP within a total deadline."""

    name = "email"

    def __init__(
        self,
        settings: EmailSettings,
        timeout: float = EMAIL_TIMEOUT_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings, self.timeout = settings, timeout
        self._context = ssl_context  # tests pass their own CA; None: the system's trusted CAs

    def describe(self) -> str:
        s = self.settings
        return f"email {s.host}:{s.effective_port} ({s.tls}) to {', '.join(s.to)}"

    def message(self, notice: Notice) -> EmailMessage:
        message = EmailMessage()
        message["Subject"] = " ".join(f"[flockparse] {notice.text}".split())[:SUBJECT_MAX]
        message["From"] = self.settings.sender
        message["To"] = ", ".join(self.settings.to)
        message["Date"] = formatdate(localtime=True)
        message["Message-ID"] = make_msgid(domain=socket.gethostname() or "flockparse")
        details = notice.as_dict()
        lines = [notice.text, ""]
        lines += [
            f"{key}: {details[key]}" for key in ("kind", "state", "node", "model", "time") if details[key]
        ]
        lines += ["", f"sent by flockparse on {details['host']}"]
        message.set_content("\n".join(lines))
        return message

    def send(self, notice: Notice) -> SendResult:
        try:
            password = self.settings.password()
        except AlertConfigError as exc:
            return SendResult(False, str(exc), retry=False)
        try:
            self._deliver(self.message(notice), password)
        except smtplib.SMTPAuthenticationError as exc:
            return SendResult(False, f"login refused: {_smtp_text(exc)}", retry=False)
        except smtplib.SMTPNotSupportedError as exc:
            return SendResult(False, f'{exc} (tls = "{self.settings.tls}")', retry=False)
        except smtplib.SMTPRecipientsRefused as exc:
            refused = ", ".join(sorted(exc.recipients))
            return SendResult(False, f"recipients refused: {refused}", retry=False)
        except smtplib.SMTPResponseException as exc:
            return SendResult(False, _smtp_text(exc), retry=500 > exc.smtp_code >= 400)
        except ssl.SSLError as exc:
            return SendResult(False, f"TLS failed: {exc.reason or exc}")
        except (smtplib.SMTPException, OSError) as exc:
            return SendResult(False, _network_text(exc, self.settings, self.timeout))
        return SendResult(True)

    def _deliver(self, message: EmailMessage, password: str | None) -> None:
        s = self.settings
        context = self._context or ssl.create_default_context()
        client: smtplib.SMTP = (
            _SMTPS(timeout=self.timeout, context=context) if s.tls == "tls" else _SMTP(timeout=self.timeout)
        )
        client._host = s.host  # what TLS checks the certificate against (set by __init__ only with a host,
        # and __init__ with a host would connect before the watchdog exists)
        watchdog = threading.Timer(self.timeout, _shut, args=(client,))
        watchdog.daemon = True
        watchdog.start()
        try:
            client.connect(s.host, s.effective_port)
            client.ehlo()
            if s.tls == "starttls":
                client.starttls(context=context)  # never falls back to plain text: no STARTTLS is an error
                client.ehlo()
            if s.user:
                client.login(s.user, password or "")
            client.send_message(message)
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()
        finally:
            watchdog.cancel()
            client.close()


def _smtp_text(exc: smtplib.SMTPResponseException) -> str:
    text = (
        exc.smtp_error.decode("utf-8", "replace")
        if isinstance(exc.smtp_error, bytes)
        else str(exc.smtp_error)
    )
    return plain(f"{exc.smtp_code} {' '.join(text.split())}"[:200])


def _network_text(exc: BaseException, settings: EmailSettings, timeout: float) -> str:
    where = f"{settings.host}:{settings.effective_port}"
    if isinstance(exc, ConnectionRefusedError):
        return f"{where}: connection refused"
    if isinstance(exc, socket.gaierror):
        return f"{where}: host name not found"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"{where}: no answer within {timeout:g}s"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return f"{where}: the server closed the connection ({plain(str(exc))[:120]})"
    return f"{where}: {plain(exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))[:160]}"
