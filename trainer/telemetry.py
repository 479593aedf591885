"""Training and collapse metrics for Prometheus, from rank 0.

Pushed to a Pushgateway (job ``ctr_trainer``, or ``ctr_collapse_monitor`` for the
offline monitor, so that neither replaces the other's group; grouping key ``run=<run id>``)
and/or served on ``/metrics``. Names follow Prometheus conventions (base
units, ``_total`` for counters, ``_seconds``/``_timestamp_seconds``):

    ctr_train_loss{run}                                   mean training loss of the last log window
    ctr_train_examples_total{run}                         training examples so far
    ctr_train_examples_per_second{run}                    throughput of the last log window
    ctr_train_step{run}                                   optimizer steps so far
    ctr_validation_auc{run} / ctr_validation_logloss{run} the latest evaluation
    ctr_embedding_information_abundance{run,field,set}    IA; set="all" is the concatenation of a field's sets
    ctr_embedding_information_abundance_ratio{run,field,set}  IA / IA of a random table of the same shape
    ctr_embedding_set_diversity{run,field}                mean (1 - mean cosine of principal angles) over set pairs
    ctr_last_success_timestamp_seconds{run}               when this run last reported successfully
    ctr_run_finished_timestamp_seconds{run}               when the run finished (absent while it trains)

An unreachable Pushgateway never stops training: one warning, then the
exporter keeps trying quietly at each report.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway, start_http_server

log = logging.getLogger("trainer.telemetry")
JOB = "ctr_trainer"
MONITOR_JOB = "ctr_collapse_monitor"


class Telemetry:
    def __init__(self, run_id: str, pushgateway: str = "", metrics_port: int = 0, job: str = JOB):
        self.run_id = run_id
        self.pushgateway = pushgateway
        self.job = job  # the Pushgateway group is (job, run): a push replaces only its own group
        self.registry = CollectorRegistry()
        r, run = self.registry, ["run"]
        self.loss = Gauge("ctr_train_loss", "Mean training loss of the last log window", run, registry=r)
        self.examples = Counter("ctr_train_examples", "Training examples processed", run, registry=r)
        self.throughput = Gauge("ctr_train_examples_per_second", "Training examples per second, last log window", run, registry=r)
        self.step = Gauge("ctr_train_step", "Optimizer steps so far", run, registry=r)
        self.val_auc = Gauge("ctr_validation_auc", "Validation AUC of the latest evaluation", run, registry=r)
        self.val_logloss = Gauge("ctr_validation_logloss", "Validation logloss of the latest evaluation", run, registry=r)
        field_set = ["run", "field", "set"]
        self.ia = Gauge(
            "ctr_embedding_information_abundance",
            "Information abundance sum(s)/max(s) of an embedding table; set=all: a field's sets concatenated",
            field_set,
            registry=r,
        )
        self.ia_ratio = Gauge(
            "ctr_embedding_information_abundance_ratio",
            "Information abundance relative to a random table of the same shape (1 = as rich as random)",
            field_set,
            registry=r,
        )
        self.diversity = Gauge(
            "ctr_embedding_set_diversity", "Mean diversity (1 - similarity) of a field's embedding sets", ["run", "field"], registry=r
        )
        self.last_success = Gauge(
            "ctr_last_success_timestamp_seconds", "Unix time of the run's last successful report", run, registry=r
        )
        self.finished = Gauge(
            "ctr_run_finished_timestamp_seconds", "Unix time the run finished training (absent while it trains)", run, registry=r
        )
        self._warned = False
        if metrics_port:
            start_http_server(metrics_port, registry=r)
            log.info("serving Prometheus metrics on :%d/metrics", metrics_port)

    def record_finished(self) -> None:
        """The run ended normally: its silence from now on is not an outage (TrainerStoppedReporting)."""
        self.finished.labels(self.run_id).set(time.time())
        self._report()

    def record_train(self, step: int, loss: float, examples: int, examples_per_second: float) -> None:
        self.step.labels(self.run_id).set(step)
        self.loss.labels(self.run_id).set(loss)
        self.examples.labels(self.run_id).inc(examples)
        self.throughput.labels(self.run_id).set(examples_per_second)
        self._report()

    def record_validation(self, auc: float, logloss: float) -> None:
        self.val_auc.labels(self.run_id).set(auc)
        self.val_logloss.labels(self.run_id).set(logloss)
        self._report()

    def record_collapse(self, report: Any) -> None:
        """Gauges from a ``trainer.collapse`` ``CollapseReport``."""
        for f in report.fields:
            for s, (ia, ratio) in enumerate(zip(f.set_ia, f.set_ia_normalized)):
                self.ia.labels(self.run_id, f.field, str(s)).set(ia)
                self.ia_ratio.labels(self.run_id, f.field, str(s)).set(ratio)
            if f.overall_ia is not None:
                self.ia.labels(self.run_id, f.field, "all").set(f.overall_ia)
                self.ia_ratio.labels(self.run_id, f.field, "all").set(f.overall_ia_normalized)
            if f.mean_diversity is not None and not math.isnan(f.mean_diversity):
                self.diversity.labels(self.run_id, f.field).set(f.mean_diversity)
        self._report()

    def _report(self) -> None:
        self.last_success.labels(self.run_id).set(time.time())
        if not self.pushgateway:
            return
        try:
            push_to_gateway(self.pushgateway, job=self.job, registry=self.registry, grouping_key={"run": self.run_id}, timeout=5)
        except OSError as e:
            if not self._warned:
                log.warning("cannot push metrics to the Pushgateway at %s (%s); training goes on", self.pushgateway, e)
                self._warned = True
