"""The package version: one home, read by the root package and by every file sonocl stamps with it."""

__version__ = "0.1.0"
