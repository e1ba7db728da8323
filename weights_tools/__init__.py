"""Command-line tools that make, convert and inspect Moshi weight files."""
