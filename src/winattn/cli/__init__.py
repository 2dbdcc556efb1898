"""The ``winattn`` command line."""
