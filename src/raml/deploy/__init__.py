"""Deployment: index a database with the teacher, search it with the student, export the query network.

Data flow: image files -> teacher at DR -> ``(N, D)`` float32 L2-normalised embeddings -> faiss
inner-product index in a directory (:mod:`raml.deploy.index` writes it, :mod:`raml.deploy.store` reads it;
index types in :mod:`raml.deploy.faiss_index`); query files -> student at QR (PyTorch or an
exported ONNX model) -> ``(Q, D)`` -> k nearest database images (:mod:`raml.deploy.search`); a network ->
ONNX / TorchScript file + preprocessing sidecar, checked against PyTorch (:mod:`raml.deploy.export`).
faiss, onnx and onnxruntime are optional dependencies, imported when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raml import lazy_exports

if TYPE_CHECKING:  # the names, for type checkers and tests/test_layering.py
    from raml.deploy.embed import embed_images
    from raml.deploy.export import (
        ExportReport,
        ParityError,
        export_onnx,
        export_torchscript,
        preprocessing_record,
        read_sidecar,
        sidecar_path,
    )
    from raml.deploy.faiss_index import INDEX_TYPES, IndexParams, build_faiss_index
    from raml.deploy.image_files import collect_images, read_image_list
    from raml.deploy.index import index_images
    from raml.deploy.search import (
        OnnxEmbedder,
        check_query_dim,
        evaluate_with_index,
        format_search_table,
        recorded_teacher_sha256,
        search_images,
        warn_if_other_teacher,
    )
    from raml.deploy.store import DatabaseIndex, IndexDirectoryError, load_index

# name -> the module that defines it; imported on first use (module __getattr__ below), so that importing
# one submodule (or a light command) does not import every other submodule's dependencies
_EXPORTS: dict[str, str] = {
    "embed_images": "raml.deploy.embed",
    "ExportReport": "raml.deploy.export",
    "ParityError": "raml.deploy.export",
    "export_onnx": "raml.deploy.export",
    "export_torchscript": "raml.deploy.export",
    "preprocessing_record": "raml.deploy.export",
    "read_sidecar": "raml.deploy.export",
    "sidecar_path": "raml.deploy.export",
    "INDEX_TYPES": "raml.deploy.faiss_index",
    "IndexParams": "raml.deploy.faiss_index",
    "build_faiss_index": "raml.deploy.faiss_index",
    "collect_images": "raml.deploy.image_files",
    "read_image_list": "raml.deploy.image_files",
    "index_images": "raml.deploy.index",
    "OnnxEmbedder": "raml.deploy.search",
    "check_query_dim": "raml.deploy.search",
    "evaluate_with_index": "raml.deploy.search",
    "format_search_table": "raml.deploy.search",
    "recorded_teacher_sha256": "raml.deploy.search",
    "search_images": "raml.deploy.search",
    "warn_if_other_teacher": "raml.deploy.search",
    "DatabaseIndex": "raml.deploy.store",
    "IndexDirectoryError": "raml.deploy.store",
    "load_index": "raml.deploy.store",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
