"""The HTTP process: FastAPI app, routes, request schemas, SSE encoders, media intake.

Runs alone as ``llamavid api`` (a split deployment's front end, which never imports torch) or
with an in-process engine as ``llamavid serve``. It talks to the model only through
``server.engine.protocol.EngineClient``.
"""
