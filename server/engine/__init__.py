"""The seam between the HTTP process and the GPU worker, imported by both and importing neither.

``protocol`` is the interface the routes call (``EngineClient``), ``jobs`` and ``events`` are the
typed messages that cross it (in memory for ``llamavid serve``, as JSON through Redis for a
split deployment), ``storage`` the interfaces of the shared media bytes and video records, and
``redis/`` the split deployment's implementations. Nothing here imports torch.
"""
