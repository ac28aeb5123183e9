"""Command-line entry points (thin: parse options, call library code)."""
