"""adaptserve: models."""
