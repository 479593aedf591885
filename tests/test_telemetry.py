"""The trainer's metric export, without a Prometheus: ``/metrics`` listens where it is told
(loopback unless told otherwise), and a Pushgateway that never answers holds up no report."""

from __future__ import annotations

import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import free_port
from trainer import telemetry
from trainer.errors import UserError
from trainer.job_config import load_config
from trainer.telemetry import Telemetry


def listening_addresses(port: int) -> set[str]:
    """The local addresses of this network namespace's TCP sockets listening on ``port``."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            columns = line.split()
            address, hex_port = columns[1].split(":")
            if columns[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words, each in host byte order
                if sys.byteorder == "little":
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, raw))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening sockets from Linux's /proc/net/tcp")
def test_metrics_listen_on_loopback_unless_told_otherwise():
    port = free_port()
    Telemetry("local-run", metrics_port=port).record_train(1, loss=0.5, examples=10, examples_per_second=1.0)
    assert listening_addresses(port) == {"127.0.0.1"}, "/metrics must not listen on every interface by default"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert 'ctr_train_step{run="local-run"} 1.0' in response.read().decode()
    exposed = free_port()
    Telemetry("exposed-run", metrics_port=exposed, metrics_address="0.0.0.0")
    assert listening_addresses(exposed) == {"0.0.0.0"}


def test_metrics_address_is_checked_at_config_load():
    assert load_config(None, ["data.path=x"]).monitoring.metrics_address == "127.0.0.1"
    assert load_config(None, ["data.path=x", "monitoring.metrics_address=0.0.0.0"]).monitoring.metrics_address == "0.0.0.0"
    with pytest.raises(UserError, match="monitoring.metrics_address 'everywhere': expected an IP address"):
        load_config(None, ["data.path=x", "monitoring.metrics_address=everywhere"])


class SilentGateway:
    """A TCP server on loopback that accepts connections and answers none of them until ``release``."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted = threading.Event()  # a push reached it
        self.answered = threading.Event()  # it answered a request
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        held = []
        while not self.release.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            held.append(connection)
            self.accepted.set()
        for connection in held:
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.answered.set()
            connection.close()

    def close(self) -> None:
        self.release.set()
        self.thread.join(timeout=10)
        self.listener.close()


@pytest.fixture
def silent_gateway():
    gateway = SilentGateway()
    yield gateway
    gateway.close()


def test_a_pushgateway_that_never_answers_holds_up_no_report(silent_gateway, caplog):
    caplog.set_level("WARNING", logger="trainer.telemetry")
    exporter = Telemetry("stalled-run", pushgateway=silent_gateway.address)
    exporter.record_train(0, loss=0.5, examples=10, examples_per_second=1.0)
    assert silent_gateway.accepted.wait(30), "the first report never reached the gateway"
    # the gateway now holds that push; 20 more reports must not wait for it
    reported = threading.Event()

    def report() -> None:
        for step in range(1, 21):
            exporter.record_train(step, loss=0.5, examples=10, examples_per_second=1.0)
        reported.set()

    threading.Thread(target=report, daemon=True).start()
    assert reported.wait(10), "20 reports did not return while the Pushgateway held a push: training waits on monitoring"
    assert not silent_gateway.answered.is_set()
    # the newest QUEUE_SIZE wait for the gateway; the older ones were dropped, and counted
    assert exporter.dropped_pushes == 20 - telemetry.QUEUE_SIZE

    started = time.monotonic()
    assert exporter.close(timeout=0.5) is False, "nothing can have gone out"
    took = time.monotonic() - started
    assert took < telemetry.PUSH_TIMEOUT_S, f"close took {took:.1f}s: it must give up at its deadline, not the push's"
    warnings = [r.getMessage() for r in caplog.records if "Pushgateway" in r.getMessage()]
    assert len(warnings) == 1 and silent_gateway.address in warnings[0], warnings


def test_validation_gauges_include_normalized_entropy():
    """``ctr_validation_ne`` (the name dashboards query) is set with the other validation gauges."""
    port = free_port()
    exporter = Telemetry("ne-run", metrics_port=port)
    exporter.record_validation(0.75, 0.45, 0.87)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'ctr_validation_ne{run="ne-run"} 0.87' in text
    assert 'ctr_validation_auc{run="ne-run"} 0.75' in text and 'ctr_validation_logloss{run="ne-run"} 0.45' in text
