"""Command-line interface: argument parsing only; every command turns flags into typed library calls."""
