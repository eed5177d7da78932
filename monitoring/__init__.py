"""adaptserve: monitoring."""
