"""The pure cores of the stream: plain Python/torch, no Kafka. Each is unit-tested on its own and
run inside the one Kafka shell (services.shell) by its adapter in services.stages."""
