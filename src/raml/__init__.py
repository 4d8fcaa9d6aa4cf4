"""raml: resolution-asymmetric deep metric learning.

A database is embedded once, offline, by a heavy teacher network at a large image size; queries are
embedded online by a cheap student at a small size that was trained to land in the teacher's space.

Data flow: ``raml.data`` (splits, images -> tensors, coupled views) -> ``raml.models`` (backbone ->
pooling -> whitening -> L2-normalised embedding; checkpoints) -> ``raml.losses`` (embeddings -> scalar)
-> ``raml.engine`` (training) ; ``raml.retrieval`` (extraction, metrics, evaluation) ; ``raml.cli``.
"""

__version__ = "0.1.0"
