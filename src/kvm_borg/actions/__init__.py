"""One module per CLI verb: orchestration of the steps."""
