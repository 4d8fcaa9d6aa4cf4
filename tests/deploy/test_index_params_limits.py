"""``IndexParams`` refuses, before anything is embedded, the values faiss cannot take: a C ``int`` overflow
(``C++ exception stoi``, ``OverflowError``), ``hnsw_m`` 1 (a crash) or beyond the sane bounds."""

from __future__ import annotations

import pytest

from raml.cli import main as cli_main
from raml.deploy import IndexParams
from raml.deploy.faiss_index import C_INT_MAX, HNSW_EF_MAX, HNSW_M_RANGE

HUGE = 3_000_000_000


@pytest.mark.parametrize(
    ("params", "flag"),
    [
        ({"index_type": "hnsw", "hnsw_m": HUGE}, "--hnsw-m"),
        ({"index_type": "hnsw", "hnsw_m": 1}, "--hnsw-m"),
        ({"index_type": "hnsw", "hnsw_m": HNSW_M_RANGE[1] + 1}, "--hnsw-m"),
        ({"index_type": "hnsw", "ef_search": HUGE}, "--ef-search"),
        ({"index_type": "hnsw", "ef_search": HNSW_EF_MAX + 1}, "--ef-search"),
        ({"index_type": "hnsw", "ef_construction": HUGE}, "ef_construction"),
        ({"index_type": "ivf", "nlist": HUGE}, "--nlist"),
        ({"index_type": "ivf", "nprobe": HUGE}, "--nprobe"),
        ({"index_type": "ivfpq", "m": HUGE}, "--m"),
        ({"index_type": "ivfpq", "nbits": HUGE}, "--nbits"),
        ({"index_type": "ivf", "seed": -1}, "seed"),
    ],
)
def test_values_faiss_cannot_take_are_refused_naming_the_flag(params, flag):
    with pytest.raises(ValueError, match=f"^{flag} .*must be"):
        IndexParams(**params)


def test_the_bounds_themselves_are_accepted():
    IndexParams("hnsw", hnsw_m=HNSW_M_RANGE[0], ef_search=HNSW_EF_MAX, ef_construction=HNSW_EF_MAX)
    IndexParams("hnsw", hnsw_m=HNSW_M_RANGE[1])
    IndexParams("ivfpq", nlist=C_INT_MAX, nprobe=C_INT_MAX, m=C_INT_MAX, nbits=16, train_size=HUGE)


def test_cli_index_refuses_a_huge_hnsw_m_before_embedding(tmp_path, monkeypatch, capsys):
    """One line, exit 2, nothing embedded and no output folder (it ended in a faiss traceback after every image
    was embedded, the folder holding the shards)."""
    import raml.deploy.index

    def embed_nothing(*args, **kwargs):
        raise AssertionError("index_images ran: the parameters were not checked first")

    monkeypatch.setattr(raml.deploy.index, "index_images", embed_nothing)
    images = tmp_path / "images"
    images.mkdir()
    output = tmp_path / "index"
    args = ["index", "--network-path", str(tmp_path / "net.pth"), "--images", str(images), "--output", str(output)]
    for extra, flag in ((["--hnsw-m", str(HUGE)], "--hnsw-m"), (["--ef-search", str(HUGE)], "--ef-search")):
        assert cli_main.main([*args, "--index-type", "hnsw", *extra]) == 2
        last = capsys.readouterr().err.splitlines()[-1]  # after faiss's loader's INFO lines
        assert last.startswith(f"raml index: error: {flag} ") and "must be" in last
        assert not output.exists()


def test_an_index_recording_parameters_past_a_bound_added_since_is_a_clear_index_error(tmp_path):
    """An index built before a bound existed (hnsw_m 600) is refused at load as an index problem, naming its
    index.json and what to do, not with a flag's message from a command that set no flag."""
    from raml.deploy.store import IndexDirectoryError, _params_from_meta

    with pytest.raises(IndexDirectoryError, match=r"idx/index.json records index parameters .*--hnsw-m.*Rebuild"):
        _params_from_meta({"params": {"index_type": "hnsw", "hnsw_m": 600}}, tmp_path / "idx")
    assert _params_from_meta({"params": {"index_type": "hnsw", "hnsw_m": 32, "unknown": 1}}).hnsw_m == 32


def test_the_index_help_states_the_bounds_the_params_check(capsys):
    with pytest.raises(SystemExit):
        cli_main.main(["index", "-h"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"HNSW links per node, {HNSW_M_RANGE[0]}-{HNSW_M_RANGE[1]}" in shown
    assert f"at most {HNSW_EF_MAX:,}" in shown


def test_the_index_commands_quiet_faiss_loader_before_importing_it(monkeypatch):
    """faiss's loader logs each instruction set it tries at INFO: eight lines on stderr before a one-line refusal
    of `raml index` (setup_logging shows INFO). The commands' dependency check quiets it before the import."""
    import logging

    from raml.cli.deploy import _require_deps

    loader = logging.getLogger("faiss.loader")
    monkeypatch.setattr(loader, "level", logging.NOTSET)
    _require_deps("faiss")
    assert loader.level == logging.WARNING
