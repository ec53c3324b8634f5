"""stream-detector: streaming anomaly detection for Kafka sensor streams."""

__version__ = "0.1.0"
