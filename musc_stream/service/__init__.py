"""The service's I/O: settings, frame contract, ingest, MQTT client, sinks, line page, systemd, wiring."""
