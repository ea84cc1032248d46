"""`serve.kafka_consume`: the service reads the tracker's topic (`stream.kafka.topic`) itself, in a consumer group
of its own (`serve.kafka_group`), so a user's list reflects events the service was not sent.

Each JSON value is mapped with `source.columns` onto a POST /v1/events event and checked with the same rules
(`Service.validate`); accepted events join their user's recent events, and are not appended to the landing table:
`shelf stream` reads the same topic. A value that is not one JSON event counts as rejected. A new group starts at
the topic's end (`serve.kafka_offset_reset: latest`: the service wants what happens from now on) and commits its offsets
automatically; a restarted service resumes where its group stopped. The consumer is confluent-kafka (librdkafka):
`stream.kafka.options` and `secret_options_env` are passed to it as they are, so they must be settings librdkafka
knows (security.protocol, sasl.mechanism, sasl.username, sasl.password, ssl.ca.location, ...).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from pydantic import ValidationError

from pipelines.core.config import ShelfConfig
from pipelines.serve.app import EventIn, Service

log = logging.getLogger("shelf.serve")
POLL_MAX_MESSAGES, POLL_SECONDS = 500, 0.5


def consumer_settings(config: ShelfConfig) -> dict[str, Any]:
    """librdkafka settings: the brokers, the group, then stream.kafka.options and the secrets from the environment.

    Raises:
        EnvironmentSetupError: an environment variable named in stream.kafka.secret_options_env is not set.
    """
    kafka = config.stream.kafka
    settings: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "group.id": config.serve.kafka_group,
        "auto.offset.reset": config.serve.kafka_offset_reset,
        "enable.auto.commit": True,
    }
    settings.update(kafka.options)
    settings.update(kafka.secret_options())
    return settings


def field_names(config: ShelfConfig) -> dict[str, str]:
    """POST /v1/events field -> the message's key for it (source.columns), for the mapped fields."""
    names = config.source.columns
    fields = {"user_id": names.user_id, "item_id": names.item_id, "event_type": names.event_type,
              "event_ts": names.event_ts, "value": names.value, "session_id": names.session_id}  # fmt: skip
    return {ours: theirs for ours, theirs in fields.items() if theirs is not None}


def to_event(value: bytes | None, fields: dict[str, str]) -> EventIn | None:
    """A message value as a POST /v1/events event (keys renamed by `fields`), or None when it is not one."""
    try:
        record = json.loads(value or b"")
        if not isinstance(record, dict):
            return None
        found = {ours: record.get(theirs) for ours, theirs in fields.items()}
        ids = {k: str(v) for k, v in found.items() if k.endswith(("_id", "_type")) and isinstance(v, int | float)}
        return EventIn(**{**found, **ids})
    except (ValueError, ValidationError):  # not JSON, not UTF-8, or a field of the wrong kind
        return None


def consume(service: Service, stop: threading.Event) -> None:
    """Poll the topic until `stop` is set; accepted events join the users' recent events (see module doc)."""
    from confluent_kafka import Consumer

    config = service.config
    fields = field_names(config)
    consumer = Consumer(consumer_settings(config))
    consumer.subscribe([config.stream.kafka.topic])
    log.info("[serve] consuming kafka topic %s as group %s", config.stream.kafka.topic, config.serve.kafka_group)
    try:
        while not stop.is_set():
            messages = [m for m in consumer.consume(POLL_MAX_MESSAGES, POLL_SECONDS) if m.error() is None]
            events = [to_event(m.value(), fields) for m in messages]
            parsed = [e for e in events if e is not None]
            rejected = len(service.accept(parsed, land=False)) if parsed else 0
            service.metrics.rejected += len(events) - len(parsed)
            if messages:
                log.debug(
                    "[serve] kafka: %d messages, %d rejected", len(messages), rejected + len(events) - len(parsed)
                )
    finally:
        consumer.close()
