"""logwarden services: settings, records, the Kafka shell and the stage cores (parse, window,
detect), replay, metrics and the `logwarden` CLI. The cores are plain Python; only `shell.py`
(and the thin `run` wrappers) talk to Kafka."""
