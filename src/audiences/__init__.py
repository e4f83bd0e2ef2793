"""audiences: a real-time, Kafka-native audience engine."""

__version__ = "0.1.0"
