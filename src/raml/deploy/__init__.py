"""Deployment: index a database with the teacher, search it with the student, export the query network.

Data flow: image files -> teacher at DR -> ``(N, D)`` float32 L2-normalised embeddings -> faiss
inner-product index in a directory (:mod:`raml.deploy.index`); query files -> student at QR (PyTorch or an
exported ONNX model) -> ``(Q, D)`` -> k nearest database images (:mod:`raml.deploy.search`); a network ->
ONNX / TorchScript file + preprocessing sidecar, checked against PyTorch (:mod:`raml.deploy.export`).
faiss, onnx and onnxruntime are optional dependencies, imported when used.
"""

from __future__ import annotations

from raml.deploy.export import (
    ExportReport,
    ParityError,
    export_onnx,
    export_torchscript,
    preprocessing_record,
    read_sidecar,
    sidecar_path,
)
from raml.deploy.index import (
    INDEX_TYPES,
    DatabaseIndex,
    IndexDirectoryError,
    IndexParams,
    build_faiss_index,
    collect_images,
    embed_images,
    index_images,
    load_index,
    read_image_list,
)
from raml.deploy.search import (
    OnnxEmbedder,
    check_query_dim,
    evaluate_with_index,
    format_search_table,
    recorded_teacher_sha256,
    search_images,
    warn_if_other_teacher,
)

__all__ = [
    "INDEX_TYPES",
    "DatabaseIndex",
    "ExportReport",
    "IndexDirectoryError",
    "IndexParams",
    "OnnxEmbedder",
    "ParityError",
    "build_faiss_index",
    "check_query_dim",
    "collect_images",
    "embed_images",
    "evaluate_with_index",
    "export_onnx",
    "export_torchscript",
    "format_search_table",
    "index_images",
    "load_index",
    "preprocessing_record",
    "read_image_list",
    "read_sidecar",
    "recorded_teacher_sha256",
    "search_images",
    "sidecar_path",
    "warn_if_other_teacher",
]
