"""adaptserve: service."""
