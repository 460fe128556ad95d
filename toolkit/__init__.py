"""The local toolkit: what runs logwarden on one machine without a deployment — the local Kafka
broker and Prometheus (from Maven Central and Debian packages), replay as Filebeat or the
OpenTelemetry Collector would write, the demo, and the compose stack check."""
