"""adaptserve: pipelines."""
