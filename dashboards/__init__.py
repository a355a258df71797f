"""Grafana dashboards and Prometheus alert rules for Piggyback, defined once and checked against real metrics."""
