"""`eyecare-edge serve`: an OpenAI-compatible HTTP server for a bundle (the `serve` extra).

Modules: `app` (FastAPI routes, loading), `jobs` (answering on a pipeline thread, the SSE
stream, error mapping), `openai_schema` (request parsing and
response bodies), `media` (data: URIs, the local-path policy, decoding), `limits` (API key, body
limit, the bounded pool of pipelines), `metrics` (Prometheus text), `static/index.html` (the page).
Nothing here imports torch.
"""
