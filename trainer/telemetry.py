"""Training and collapse metrics for Prometheus, from rank 0.

Pushed to a Pushgateway (job ``ctr_trainer``, or ``ctr_collapse_monitor`` for the
offline monitor, so that neither replaces the other's group; grouping key ``run=<run id>``)
and/or served on ``/metrics`` (bound to ``metrics_address``: 127.0.0.1 unless told
otherwise). Names follow Prometheus conventions (base units, ``_total`` for counters,
``_seconds``/``_timestamp_seconds``):

    ctr_train_loss{run}                                   mean training loss of the last log window
    ctr_train_examples_total{run}                         training examples so far
    ctr_train_examples_per_second{run}                    throughput of the last log window
    ctr_train_step{run}                                   optimizer steps so far
    ctr_validation_auc{run} / ctr_validation_logloss{run} the latest evaluation
    ctr_validation_ne{run}                                       its normalized entropy (logloss / entropy of the base rate)
    ctr_embedding_information_abundance{run,field,set}    IA; set="all" is the concatenation of a field's sets
    ctr_embedding_information_abundance_ratio{run,field,set,rank_bound}  IA / IA of a random table of the same shape
    ctr_embedding_set_diversity{run,field}                mean (1 - mean cosine of principal angles) over set pairs
    ctr_embedding_set_diversity_ratio{run,field,rank_bound}  diversity / diversity of the same sets of that random table
                                                          (absent where undefined: a field of at most K ids, whose sets
                                                          all span R^ids, so its diversity is 0 whatever training does)
    ctr_last_success_timestamp_seconds{run}               when this run last reported successfully
    ctr_run_finished_timestamp_seconds{run}               when the run finished (absent while it trains)

``rank_bound="true"`` marks a ratio whose table has fewer rows (ids) than columns (a set:
fewer than K; set="all": fewer than M*K; two compared sets: fewer than 2K): the id count,
not training, caps its rank, and the alert rules skip it (deploy/prometheus/rules.yaml).

Training never waits on the Pushgateway: each report queues a snapshot for a background
thread that pushes with a ``PUSH_TIMEOUT_S`` timeout; at most ``QUEUE_SIZE`` wait (a new
one drops the oldest, counted in ``dropped_pushes``). ``close()`` (by ``record_finished``,
else at exit) waits at most ``CLOSE_TIMEOUT_S`` for them. A Pushgateway that is unreachable
or never answers costs one warning, never the run.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway, start_http_server
from prometheus_client.registry import Collector

log = logging.getLogger("trainer.telemetry")
JOB = "ctr_trainer"
MONITOR_JOB = "ctr_collapse_monitor"
PUSH_TIMEOUT_S = 5.0  # one push's socket timeout
QUEUE_SIZE = 4  # snapshots waiting to be pushed; each push replaces the group, so the newest matter
CLOSE_TIMEOUT_S = 5.0  # how long close() waits for the queued pushes


class Telemetry:
    def __init__(self, run_id: str, pushgateway: str = "", metrics_port: int = 0, job: str = JOB,
                 metrics_address: str = "127.0.0.1"):
        self.run_id = run_id
        self.registry = CollectorRegistry()
        r, run = self.registry, ["run"]
        self.loss = Gauge("ctr_train_loss", "Mean training loss of the last log window", run, registry=r)
        self.examples = Counter("ctr_train_examples", "Training examples processed", run, registry=r)
        self.throughput = Gauge("ctr_train_examples_per_second", "Training examples per second, last log window", run, registry=r)
        self.step = Gauge("ctr_train_step", "Optimizer steps so far", run, registry=r)
        self.val_auc = Gauge("ctr_validation_auc", "Validation AUC of the latest evaluation", run, registry=r)
        self.val_logloss = Gauge("ctr_validation_logloss", "Validation logloss of the latest evaluation", run, registry=r)
        self.val_ne = Gauge(
            "ctr_validation_ne", "Validation normalized entropy (logloss / entropy of the base rate) of the latest evaluation",
            run, registry=r,
        )  # fmt: skip
        field_set = ["run", "field", "set"]
        self.ia = Gauge(
            "ctr_embedding_information_abundance",
            "Information abundance sum(s)/max(s) of an embedding table; set=all: a field's sets concatenated",
            field_set,
            registry=r,
        )
        self.ia_ratio = Gauge(
            "ctr_embedding_information_abundance_ratio",
            "Information abundance relative to a random table of the same shape (1 = as rich as random); "
            'rank_bound="true": the table has fewer rows (ids) than columns, so the id count caps its rank',
            [*field_set, "rank_bound"],
            registry=r,
        )
        self.diversity = Gauge(
            "ctr_embedding_set_diversity", "Mean diversity (1 - similarity) of a field's embedding sets", ["run", "field"], registry=r
        )
        self.diversity_ratio = Gauge(
            "ctr_embedding_set_diversity_ratio",
            "Set diversity relative to the same sets of a random table of the same shape (1 = as diverse as random); "
            'rank_bound="true": fewer ids than two sets have columns, so some directions are shared whatever training does',
            ["run", "field", "rank_bound"],
            registry=r,
        )
        self.last_success = Gauge(
            "ctr_last_success_timestamp_seconds", "Unix time of the run's last successful report", run, registry=r
        )
        self.finished = Gauge(
            "ctr_run_finished_timestamp_seconds", "Unix time the run finished training (absent while it trains)", run, registry=r
        )
        # the Pushgateway group is (job, run): a push replaces only its own group
        self._pusher = _Pusher(pushgateway, job, run_id) if pushgateway else None
        if self._pusher is not None:
            atexit.register(self.close)
        if metrics_port:
            start_http_server(metrics_port, addr=metrics_address, registry=r)
            log.info("serving Prometheus metrics on %s:%d/metrics", metrics_address, metrics_port)

    @property
    def dropped_pushes(self) -> int:
        """Reports never pushed because newer ones filled the queue behind a slow Pushgateway."""
        return self._pusher.dropped if self._pusher is not None else 0

    def record_finished(self) -> None:
        """The run ended normally: its silence from now on is not an outage (TrainerStoppedReporting)."""
        self.finished.labels(self.run_id).set(time.time())
        self._report()
        self.close()

    def record_train(self, step: int, loss: float, examples: int, examples_per_second: float) -> None:
        self.step.labels(self.run_id).set(step)
        self.loss.labels(self.run_id).set(loss)
        self.examples.labels(self.run_id).inc(examples)
        self.throughput.labels(self.run_id).set(examples_per_second)
        self._report()

    def record_validation(self, auc: float, logloss: float, ne: float = math.nan) -> None:
        self.val_auc.labels(self.run_id).set(auc)
        self.val_logloss.labels(self.run_id).set(logloss)
        self.val_ne.labels(self.run_id).set(ne)
        self._report()

    def record_collapse(self, report: Any) -> None:
        """Gauges from a ``trainer.collapse`` ``CollapseReport``."""
        for f in report.fields:
            for s, (ia, ratio) in enumerate(zip(f.set_ia, f.set_ia_normalized)):
                self.ia.labels(self.run_id, f.field, str(s)).set(ia)
                self.ia_ratio.labels(self.run_id, f.field, str(s), _flag(f.set_rank_bound)).set(ratio)
            if f.overall_ia is not None:
                self.ia.labels(self.run_id, f.field, "all").set(f.overall_ia)
                self.ia_ratio.labels(self.run_id, f.field, "all", _flag(f.overall_rank_bound)).set(f.overall_ia_normalized)
            if f.mean_diversity is not None and not math.isnan(f.mean_diversity):
                self.diversity.labels(self.run_id, f.field).set(f.mean_diversity)
            if not math.isnan(f.mean_diversity_normalized):
                self.diversity_ratio.labels(self.run_id, f.field, _flag(f.diversity_rank_bound)).set(f.mean_diversity_normalized)
        self._report()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait at most ``timeout`` seconds for the queued pushes; later reports are not pushed.
        True when every queued report went out (or failed: an unreachable gateway does not wait)."""
        if self._pusher is None:
            return True
        atexit.unregister(self.close)
        if self._pusher.close(timeout):
            return True
        self._pusher.warn_once(f"still queued after {timeout:g}s")
        return False

    def _report(self) -> None:
        self.last_success.labels(self.run_id).set(time.time())
        if self._pusher is not None:
            self._pusher.submit(_Snapshot(self.registry))


def _flag(value: bool) -> str:
    return "true" if value else "false"


class _Snapshot(Collector):
    """The series as they were at one report: what a queued push sends."""

    def __init__(self, registry: CollectorRegistry):
        self._families = list(registry.collect())

    def collect(self):
        return self._families


class _Pusher:
    """Pushes snapshots to a Pushgateway from a daemon thread, oldest first; the queue is bounded."""

    def __init__(self, gateway: str, job: str, run_id: str):
        self.gateway, self.job, self.run_id = gateway, job, run_id
        self.dropped = 0
        self._queue: deque[_Snapshot] = deque()
        self._busy = self._closed = self._warned = False
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name=f"pushgateway-{run_id}", daemon=True).start()

    def submit(self, snapshot: _Snapshot) -> None:
        with self._cond:
            if self._closed:
                return
            if len(self._queue) == QUEUE_SIZE:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(snapshot)
            self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Take no more snapshots; wait up to ``timeout`` s for the queue to empty (True if it did)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def warn_once(self, reason: object) -> None:
        with self._cond:
            if self._warned:
                return
            self._warned = True
        log.warning("cannot push metrics to the Pushgateway at %s (%s); training goes on", self.gateway, reason)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                snapshot = self._queue.popleft()
                self._busy = True
            try:
                push_to_gateway(self.gateway, job=self.job, registry=snapshot, grouping_key={"run": self.run_id},
                                timeout=PUSH_TIMEOUT_S)
            except Exception as e:  # whatever the gateway or the network does, this thread goes on
                self.warn_once(e)
