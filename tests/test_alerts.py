"""Alerts (flockparse/alerts.py, flockparse/notify.py): the rules and their cool-down as plain data, then
real deliveries to a local HTTP receiver and a local SMTP server (aiosmtpd) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from helpers import LLAMA, Recorder
from receivers import Receiver

from flockparse.alerts import FIRING, RESOLVED, Alerter, AlertRules, RetryPolicy, send_test
from flockparse.events import Event
from flockparse.notify import EmailChannel, EmailSettings, Notice, WebhookChannel, webhook_body

N = "http://10.0.0.1:11434"
GPU_ROW = {"location": "GPU (VRAM)", "gpu_percent": 100}
CPU_ROW = {"location": "CPU (RAM)", "gpu_percent": 0}
FAST_RETRY = RetryPolicy(attempts=3, first_s=0.01, cap_s=0.05)


def placements(models: dict, previous: dict, node: str = N) -> Event:
    changed = sorted(k for k in models.keys() | previous.keys() if models.get(k) != previous.get(k))
    return Event(
        "placements_changed", node=node, data={"models": models, "previous": previous, "changed": changed}
    )


# ------------------------------------------------------------------------------------ rules, no sockets
def test_a_flapping_node_sends_down_and_back_once_per_cooldown() -> None:
    rules = AlertRules(cooldown_s=600)
    sent: list[Notice] = []
    now = 1000.0
    for _ in range(50):  # down and up every few seconds for five minutes
        sent += rules.observe(Event("node_down", node=N, message=f"{N} is down: connection refused"), now)
        now += 3
        sent += rules.observe(Event("node_up", node=N), now)
        now += 3
    assert [n.state for n in sent] == [FIRING, RESOLVED]
    assert rules.suppressed == 98
    sent += rules.observe(Event("node_down", node=N, message=f"{N} is down"), now)  # and it stays down
    assert len(sent) == 2
    assert rules.due(now) == []
    assert rules.next_due() == pytest.approx(1600)
    [late] = rules.due(1600)
    assert late.state == FIRING and late.kind == "node_down"
    assert late.changes == 98  # 49 downs and 49 ups since the last message were held back
    assert "held back" in late.text
    assert rules.due(1700) == []


def test_a_priority_model_falling_to_cpu_fires_and_its_return_resolves() -> None:
    rules = AlertRules(cooldown_s=600, patterns=lambda: ["llama3.1"])
    assert rules.observe(placements({LLAMA: GPU_ROW}, {}), 0) == []  # first seen on GPU: nothing
    [fell] = rules.observe(placements({LLAMA: CPU_ROW}, {LLAMA: GPU_ROW}), 10)
    assert (fell.state, fell.kind, fell.node, fell.model) == (FIRING, "model_off_gpu", N, LLAMA)
    assert "fell off the GPU" in fell.message and "on CPU" in fell.message
    [back] = rules.observe(placements({LLAMA: GPU_ROW}, {LLAMA: CPU_ROW}), 20)
    assert back.state == RESOLVED and "back on GPU" in back.message
    other = "codellama:latest"
    assert rules.observe(placements({other: CPU_ROW}, {}), 30) == []  # not a priority model


def test_a_users_force_cpu_is_not_a_fall() -> None:
    rules = AlertRules(cooldown_s=0, patterns=lambda: ["*"])
    rules.observe(placements({LLAMA: GPU_ROW}, {}), 0)
    rules.observe(Event("move_started", node=N, model=LLAMA, data={"target": "CPU", "source": "user"}), 1)
    rules.observe(Event("move_finished", node=N, model=LLAMA, data={"target": "CPU", "reason": "moved"}), 2)
    assert rules.observe(placements({LLAMA: CPU_ROW}, {LLAMA: GPU_ROW}), 3) == []


def test_failed_moves_fire_once_per_cooldown_and_a_move_that_works_resolves() -> None:
    rules = AlertRules(cooldown_s=600)

    def failed(now: float, reason: str = "out_of_memory") -> list[Notice]:
        data = {"target": "GPU", "source": "optimizer", "reason": reason}
        return rules.observe(
            Event("move_failed", node=N, model=LLAMA, message="does not fit", data=data), now
        )

    [first] = failed(0)
    assert first.state == FIRING and "out_of_memory" in first.message
    assert failed(60) == [] and failed(120) == []
    assert failed(130, reason="cancelled") == []  # Ctrl-C is not a failure
    [again] = failed(700)  # still failing after the cool-down: said again, with the count
    assert again.changes == 2
    ok = Event("move_finished", node=N, model=LLAMA, data={"target": "GPU", "reason": "moved"})
    [resolved] = rules.observe(ok, 710)
    assert resolved.state == RESOLVED


def test_vram_held_by_other_programs_fires_and_resolves() -> None:
    """The GPU exporters' condition (flockparse/gpu_metrics): other programs' VRAM keeps a model off."""
    rules = AlertRules(cooldown_s=600)
    held = Event(
        "vram_held_by_others", node=N, model=LLAMA, message=f"VRAM held by other programs keeps {LLAMA}"
    )
    [fire] = rules.observe(held, 0)
    assert (fire.kind, fire.state, fire.model) == ("vram_held_by_others", FIRING, LLAMA)
    assert rules.observe(held, 1) == []  # the same condition again: nothing new
    [done] = rules.observe(Event("vram_held_by_others_resolved", node=N, model=LLAMA, message="free"), 9)
    assert done.state == RESOLVED


def test_gpu_lost_and_back() -> None:
    rules = AlertRules(cooldown_s=600)
    [lost] = rules.observe(Event("gpu_lost", node=N, message=f"{N} lost its GPU"), 0)
    [back] = rules.observe(Event("gpu_back", node=N, message=f"{N} has its GPU again"), 5)
    assert (lost.state, back.state) == (FIRING, RESOLVED)
    assert back.message.endswith("again")


# ------------------------------------------------------------------------------------ a webhook receiver
@pytest.fixture
def receiver() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(**options: Any) -> Receiver:
        made.append(Receiver(**options))
        return made[-1]

    yield make
    for item in made:
        item.close()


def test_webhook_bodies_json_slack_and_discord(receiver) -> None:
    notice = Notice(
        "model_off_gpu", FIRING, "priority model <llama> & co fell off the GPU", node=N, model=LLAMA
    )
    for fmt in ("json", "slack", "discord"):
        target = receiver()
        channel = WebhookChannel(target.url + "?thread=1", fmt)
        assert channel.send(notice).ok
        assert target.paths == ["/services/T000/B000/SECRET?thread=1"]
        [body] = target.bodies
        assert body == webhook_body(notice, fmt)
        channel.close()
    assert (
        webhook_body(notice, "json")["state"] == "firing" and webhook_body(notice, "json")["model"] == LLAMA
    )
    assert "&lt;llama&gt; &amp; co" in webhook_body(notice, "slack")["text"]  # Slack's mrkdwn escaped
    assert webhook_body(notice, "discord")["allowed_mentions"] == {"parse": []}  # a model name pings nobody


def test_a_failing_receiver_is_retried_with_back_off_until_it_answers(receiver) -> None:
    target = receiver(statuses=[500, 503])
    alerter = Alerter([WebhookChannel(target.url, "json")], cooldown_s=0, retry=FAST_RETRY)
    alerter.on_event(Event("node_down", node=N, message=f"{N} is down"))
    assert alerter.flush()
    assert len(target.bodies) == 3  # two failures, then delivered
    [status] = alerter.status()["channels"]
    assert (status["sent"], status["failed"]) == (1, 0)
    alerter.close()


def test_a_receiver_that_refuses_is_given_up_at_once_with_one_event(receiver) -> None:
    target = receiver(statuses=[404])
    told: list[Event] = []
    alerter = Alerter([WebhookChannel(target.url, "slack")], cooldown_s=0, retry=FAST_RETRY, emit=told.append)
    alerter.on_event(Event("gpu_lost", node=N, message=f"{N} lost its GPU"))
    assert alerter.flush()
    assert len(target.bodies) == 1  # a 404 will not get better: no retry
    [failed] = told
    assert failed.kind == "alert_failed"
    assert "HTTP 404" in failed.message
    assert "SECRET" not in failed.message  # the webhook's secret path is never shown
    alerter.close()


def test_a_hung_receiver_ends_at_the_deadline_and_the_secret_stays_hidden(receiver) -> None:
    target = receiver(hang=True)
    result = WebhookChannel(target.url, "json", timeout=0.3).send(Notice("test", "test", "hello"))
    assert not result.ok and result.retry
    assert "within 0.3s" in result.error
    assert "SECRET" not in result.error and "services" not in result.error


def test_a_flapping_node_on_the_simulator_sends_a_handful_of_messages(
    receiver, sim_node, make_balancer
) -> None:
    """Six times down and up (each seen by the health monitor): one "down" and one "back online" reach the
    receiver, the rest is held back by the cool-down."""
    target = receiver()
    node = sim_node(vram_gb=24)
    lb = make_balancer([node.url], health_interval=0.05, start=False)
    events = Recorder(lb)  # listening before the first check: its node_up is never missed
    lb.start()
    events.wait("node_up")
    alerter = Alerter([WebhookChannel(target.url, "json")], cooldown_s=60, retry=FAST_RETRY).attach(lb)
    watched_from = len(events.events)
    for flap in range(1, 7):
        node.set_fault("down")
        events.wait("node_down", flap)
        node.clear_fault()
        events.wait("node_up", flap + 1)
    assert alerter.flush()
    states = [(body["kind"], body["state"]) for body in target.bodies]
    assert states == [("node_down", "firing"), ("node_down", "resolved")]
    assert target.bodies[1]["message"] == f"{node.url} is back online"
    flaps = [e for e in events.events[watched_from:] if e.kind in ("node_down", "node_up")]
    assert len(flaps) >= 12
    assert alerter.status()["suppressed"] == len(flaps) - 2  # every change but the two sent was held back
    alerter.close()


# ------------------------------------------------------------------------------------ e-mail
class Mailbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's
        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
        return "250 OK"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth: Any) -> AuthResult:
        ok = isinstance(auth, LoginPassword) and (auth.login, auth.password) == (b"alerts", b"s3cret")
        self.logins.append((auth.login, auth.password))
        return AuthResult(success=ok, handled=False)  # not handled: aiosmtpd answers 535 itself


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway CA: the server's certificate for 127.0.0.1 and a client that trusts only that CA."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@pytest.fixture
def smtp_server(tls) -> Iterator[Any]:
    controllers: list[Controller] = []

    def start(mode: str) -> tuple[Mailbox, int]:
        box, port = Mailbox(), free_port()
        options: dict[str, Any] = {"authenticator": box.authenticate}
        if mode == "starttls":
            options.update(tls_context=tls[0], require_starttls=True)
        elif mode == "tls":  # the whole connection is TLS; aiosmtpd only counts STARTTLS as TLS for AUTH
            options.update(ssl_context=tls[0], auth_require_tls=False)
        else:
            options.update(auth_require_tls=False)
        controller = Controller(box, hostname="127.0.0.1", port=port, **options)
        controller.start()
        controllers.append(controller)
        return box, port

    yield start
    for controller in controllers:
        controller.stop()


@pytest.mark.parametrize("mode", ["starttls", "tls", "none"])
def test_email_is_sent_with_login_over_each_tls_mode(smtp_server, tls, mode, monkeypatch) -> None:
    box, port = smtp_server(mode)
    monkeypatch.setenv("FLOCKPARSE_TEST_SMTP", "s3cret")
    settings = EmailSettings(
        host="127.0.0.1", port=port, tls=mode, user="alerts", password_env="FLOCKPARSE_TEST_SMTP",
        sender="flockparse@example.com", to=("ops@example.com", "oncall@example.com"),
    )  # fmt: skip
    channel = EmailChannel(settings, timeout=10, ssl_context=tls[1])
    result = channel.send(Notice("gpu_lost", FIRING, f"{N} lost its GPU", node=N))
    assert result.ok, result.error
    [(recipients, message)] = box.messages
    assert recipients == ["ops@example.com", "oncall@example.com"]
    assert message["Subject"] == f"[flockparse] [FIRING] {N} lost its GPU"
    assert message["From"] == "flockparse@example.com"
    assert "node: " + N in message.get_payload()
    assert box.logins == [(b"alerts", b"s3cret")]


def test_a_refused_login_and_a_missing_password_are_clear_errors(smtp_server, tls, monkeypatch) -> None:
    box, port = smtp_server("starttls")
    monkeypatch.setenv("FLOCKPARSE_TEST_SMTP", "wrong")
    base = dict(host="127.0.0.1", port=port, user="alerts", sender="a@example.com", to=("b@example.com",))
    refused = EmailChannel(EmailSettings(**base, password_env="FLOCKPARSE_TEST_SMTP"), ssl_context=tls[1])
    result = refused.send(Notice("test", "test", "hi"))
    assert not result.ok and not result.retry
    assert result.error.startswith("login refused: 535")
    monkeypatch.delenv("FLOCKPARSE_TEST_SMTP")
    result = refused.send(Notice("test", "test", "hi"))
    assert result.error == "[alerts.email] password_env: $FLOCKPARSE_TEST_SMTP is not set"
    assert box.messages == []


def test_a_password_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "smtp-password"
    path.write_text("s3cret\n")
    os.chmod(path, 0o644)
    settings = EmailSettings(host="h", sender="a@b", to=("c@d",), user="u", password_file=str(path))
    with pytest.raises(ValueError, match="can be read by others"):
        settings.password()
    os.chmod(path, 0o600)
    assert settings.password() == "s3cret"


def test_an_untrusted_certificate_is_refused(smtp_server) -> None:
    """The server's certificate is from a CA the client does not trust: no mail, a TLS error."""
    _, port = smtp_server("tls")
    settings = EmailSettings(
        host="127.0.0.1", port=port, tls="tls", sender="a@example.com", to=("b@example.com",)
    )
    result = EmailChannel(settings, timeout=10).send(Notice("test", "test", "hi"))
    assert not result.ok
    assert "TLS failed" in result.error and "CERTIFICATE_VERIFY_FAILED" in result.error


def test_send_test_reports_each_channel(receiver) -> None:
    target = receiver()
    bad = EmailSettings(
        host="127.0.0.1", port=free_port(), tls="none", sender="a@example.com", to=("b@x.org",)
    )
    results = send_test([WebhookChannel(target.url, "discord"), EmailChannel(bad, timeout=5)])
    assert [r["ok"] for r in results] == [True, False]
    assert (
        results[0]["channel"].startswith("webhook (discord) http://127.0.0.1:")
        and "SECRET" not in results[0]["channel"]
    )
    assert "connection refused" in results[1]["error"]
    assert "test message from flockparse" in target.bodies[0]["content"]
