"""Tests of musc_stream/sinks/; a package, so test_metrics.py here and in tests/ can coexist."""
