"""Serving trained runs over HTTP (serve.py): the batching engine for language models
(`engine`), the classifier (`classifier`), request schemas (`schemas`) and the FastAPI app
(`api`). docs/serving.md describes the design."""
