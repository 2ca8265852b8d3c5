"""What the interactive console runs beside the prompt: the history recorder, the alerter, `--metrics` and
`--dashboard` (started by flockparsecli.py once the others run: its history read needs the recorder).

Each is a core module (flockparse/history.py, alerts.py, metrics.py) the console only wires to its
balancer and config: started before the balancer's first health check (so its node_up and placements are
recorded), closed when the console leaves. One-shot and stdin modes record and send nothing; they read
history (`history_reader`) and can send `alerts test`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flockparse.alerts import Alerter
from flockparse.console.config import Config
from flockparse.history import FILE_NAME, History, HistoryRecorder


@dataclass
class Services:
    recorder: HistoryRecorder | None = None
    history: History | None = None
    alerter: Alerter | None = None
    metrics: Any = None  # flockparse.metrics.MetricsServer (imported only when --metrics is given)
    dashboard: Any = None  # flockparse.dashboard.server.DashboardServer (--dashboard; it reads `history`)

    def close(self) -> None:
        if self.dashboard is not None:
            self.dashboard.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.alerter is not None:
            self.alerter.close()
        if self.recorder is not None:
            self.recorder.close()


def history_reader(config: Config, files_dir: Path | None) -> History | None:
    """The history file in `files_dir`, or None when history is off (history_days = 0, no directory)."""
    if files_dir is None or config.history_days <= 0:
        return None
    return History(files_dir / FILE_NAME)


def start_services(
    balancer: Any, config: Config, files_dir: Path | None, metrics_address: tuple[str, int] | None
) -> Services:
    """Start what the config asks for. OSError when the metrics address cannot be listened on (the
    others are started afterwards, so nothing is left running)."""
    services = Services()
    if metrics_address is not None:
        from flockparse.metrics import start_metrics_server

        services.metrics = start_metrics_server(metrics_address, balancer)
    reader = history_reader(config, files_dir)
    if reader is not None:
        services.recorder = HistoryRecorder(reader.path, config.history_days).attach(balancer)
        recorder = services.recorder
        services.history = History(reader.path, before_read=lambda: recorder.flush(2.0))
    if config.alerts.configured:
        services.alerter = Alerter.from_settings(config.alerts).attach(balancer)
    if services.metrics is not None:  # the collector reports the writer's and the sender's health too
        services.metrics.collector.history = services.recorder
        services.metrics.collector.alerter = services.alerter
    return services
