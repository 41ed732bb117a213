"""Integration tests against a real Mosquitto broker."""
