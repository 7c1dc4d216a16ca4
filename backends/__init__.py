"""Backends: where devices come from (mock, NVML, partitioned)."""
