"""The REST API (docs/api.md): thin views over the pipeline's stage functions."""
