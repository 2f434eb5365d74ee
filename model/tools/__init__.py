"""Tools around the model, not the inference core: random checkpoints (``tiny``), writing a model in
the released layout (``export``) and the reference parity check (``parity``).

They build on the core (``model/*.py``), which never imports them: serving needs none of this.
"""
