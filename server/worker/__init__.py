"""The GPU side: loading the model, extracting features, answering questions, emitting events.

``runner.ModelRunner`` is the same in both deployments; ``local.LocalEngine`` drives it inside
the HTTP process (``llamavid serve``) and ``main.Worker`` drives it from Redis streams
(``llamavid worker``).
"""
