"""The tool's version: one string, written into every run's settings and every export."""
VERSION = "2.0.0"
