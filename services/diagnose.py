"""Why Kafka refused a client, in one line a person can act on.

librdkafka retries a refused login every few hundred milliseconds and logs each try; the request
that was waiting fails only at its timeout, with "Broker transport failure", which names no
cause. The CLI (services.cli) catches that failure and asks :func:`explain`, which connects once
more with an error callback and names what librdkafka saw: SASL credentials the broker refused, a
broker certificate the client could not verify.
"""
from __future__ import annotations

import logging
import re
import time

from services.settings import Settings

# librdkafka's "<broker>: SASL authentication error: <why> (after 338ms in state AUTH_REQ)"
_DETAIL = re.compile(r"^\S+: (?:SASL authentication error: |SSL handshake failed: )?(?P<why>.*?)"
                     r"(?: \(after \d+ms in state \w+\))?$")
_silent = logging.getLogger("logwarden.diagnose.rdkafka")
_silent.propagate = False
_silent.addHandler(logging.NullHandler())


def _why(text: str) -> str:
    m = _DETAIL.match(text)
    return m.group("why") if m else text


def login_problem(settings: Settings, timeout: float = 8.0) -> str | None:
    """One line saying why the cluster refuses ``settings``' client (authentication or TLS), or
    None when it accepts it or the failure is of another kind (no broker listening, ...)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    seen: list = []
    admin = AdminClient(settings.kafka_config() | {"error_cb": seen.append, "logger": _silent})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=1.0)
            return None                            # it can talk to the cluster after all
        except KafkaException:
            pass
        admin.poll(0.1)                            # serves error_cb
        for err in seen:
            if err.code() == KafkaError._AUTHENTICATION:
                return (f"Kafka authentication failed for {settings.sasl_mechanism or 'SASL'} user "
                        f"{settings.sasl_username!r} at {settings.bootstrap()}: {_why(err.str())}; "
                        "check LOGWARDEN_SASL_USERNAME and LOGWARDEN_SASL_PASSWORD")
            if err.code() == KafkaError._SSL:
                return (f"TLS with Kafka at {settings.bootstrap()} failed: {_why(err.str())}; "
                        "check LOGWARDEN_SSL_CA_LOCATION (the CA that signed the brokers' certificates)")
    return None


def explain(err: Exception, settings: Settings) -> tuple[str, int]:
    """(one line, exit status) for a Kafka failure that reached the command line: status 2 when
    the settings are at fault (credentials, TLS), 1 otherwise."""
    problem = login_problem(settings)
    if problem is not None:
        return problem, 2
    first = err.args[0] if err.args else err
    text = first.str() if hasattr(first, "str") else str(first)
    return f"Kafka at {settings.bootstrap()}: {text}", 1
