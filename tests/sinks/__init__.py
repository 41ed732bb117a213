"""Tests of musc_stream/service/sinks/; a package, so test_metrics.py here and in tests/ can coexist."""
