"""Where decisions go: MQTT results and alerts, the Parquet audit log, Prometheus metrics."""
