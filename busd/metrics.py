"""What the bus counts, in Prometheus form (prometheus-client), one registry per server."""
from __future__ import annotations

import collections
from typing import Any, Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, Metric

CONTENT_TYPE = CONTENT_TYPE_LATEST


class BusMetrics:
    def __init__(self, parked_waiters: Callable[[], int],
                 wakeups: Callable[[], Mapping[str, int]]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.stored = Counter("agent_bus_messages_stored", "Messages committed to storage.",
                              ["channel"], registry=self.registry)
        self.delivered = Counter("agent_bus_messages_delivered",
                                 "Messages handed to a receiver (rapid recv or el-ipc read).",
                                 ["channel"], registry=self.registry)
        self.parked = Gauge("agent_bus_parked_waiters", "Long-polls parked right now.",
                            registry=self.registry)
        self.parked.set_function(parked_waiters)
        self.registry.register(_Wakeups(wakeups))
        self.latency = Histogram(
            "agent_bus_request_duration_seconds", "Time to answer a request (long-polls included).",
            ["route"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                     10, 30))
        self.commit_batch = Histogram(
            "agent_bus_commit_batch_messages", "Messages made durable by one commit.",
            registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.errors = Counter("agent_bus_errors", "Error replies, by error code.", ["code"],
                              registry=self.registry)

        # Labelled children by label value: labels() takes a lock and builds a key on
        # every call, and these are counted on every request and every message.
        self._latency_of: dict[str, Any] = {}
        self._stored_on: dict[str, Any] = {}
        self._delivered_on: dict[str, Any] = {}

    def answered(self, route: str, seconds: float) -> None:
        """A request to `route` was answered after `seconds`."""
        child = self._latency_of.get(route)
        if child is None:
            child = self._latency_of[route] = self.latency.labels(route)
        child.observe(seconds)

    def committed(self, messages: Sequence) -> None:
        self._count_by_channel(messages, self.stored, self._stored_on)
        self.commit_batch.observe(len(messages))

    def handed_out(self, messages: Sequence) -> None:
        self._count_by_channel(messages, self.delivered, self._delivered_on)

    @staticmethod
    def _count_by_channel(messages: Sequence, counter: Counter, children: dict) -> None:
        """One increment per channel, not per message."""
        if not messages:
            return
        channel = messages[0].channel
        if all(m.channel == channel for m in messages):
            counts = {channel: len(messages)}
        else:
            counts = collections.Counter(m.channel for m in messages)
        for channel, count in counts.items():
            child = children.get(channel)
            if child is None:
                child = children[channel] = counter.labels(channel)
            child.inc(count)

    def exposition(self, channels: tuple[str, ...] | None = None) -> bytes:
        """The text format; with `channels`, samples labelled with any other channel are
        left out (a token limited to some channels learns nothing of the others)."""
        if channels is None:
            return generate_latest(self.registry)
        return generate_latest(_OnlyChannels(self.registry, channels))


class _Wakeups:
    """The hub's counts of why parked long-polls stopped waiting, read when scraped."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]):
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "agent_bus_long_poll_wakeups",
            "Parked long-polls woken, by reason: commit (a message for them was committed), "
            "recheck (commits may have gone unseen: all re-check), shutdown, timeout (the "
            "hold ran out).", labels=["reason"])
        for reason, count in self.counts().items():
            family.add_metric([reason], count)
        yield family


class _OnlyChannels:
    """A registry view whose samples carry no channel label but the given ones."""

    def __init__(self, registry: CollectorRegistry, channels: tuple[str, ...]):
        self.registry = registry
        self.channels = set(channels)

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            kept = [sample for sample in metric.samples
                    if "channel" not in sample.labels or sample.labels["channel"] in self.channels]
            view = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            view.samples = kept
            yield view
