"""What the process runs on: configuration, logging, telemetry, the clock-free helpers for the heap and eager tasks."""
