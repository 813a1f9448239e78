"""Serving trained runs over HTTP (serve.py): the FastAPI app (`api`) over the served run
(`service`: request checks, admission control, answers), the batching engine for language
models (`engine`) and its compiled slot programs (`slots`), the classifier (`classifier`), the
incremental detokenizer (`detokenizer`) and request schemas (`schemas`). docs/serving.md
describes the design."""
