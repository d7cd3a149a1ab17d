"""The command line: flags, their parsing into Settings, and the cross-validation table."""
