"""Hand-mutation survivors of raml.deploy.faiss_index's parameter checks, now killed: each bound is checked
against the training sample (not the number of images) and at its exact edge."""

from __future__ import annotations

import pytest

from raml.deploy.faiss_index import IndexParams


def test_nlist_is_checked_against_the_training_sample_not_the_number_of_images():
    with pytest.raises(ValueError, match=r"--nlist 50 needs at least 50 training vectors but only 20 are available"):
        IndexParams("ivf", nlist=50, train_size=20).resolve(100, 8)
    assert IndexParams("ivf", nlist=20, train_size=20).resolve(100, 8).nlist == 20  # the edge itself is fine


def test_nbits_needs_one_training_vector_per_centroid_at_the_edge():
    with pytest.raises(ValueError, match=r"--nbits 8 needs at least 256 training vectors .* only 255 are available"):
        IndexParams("ivfpq", nlist=1, m=2, nbits=8, train_size=255).resolve(300, 8)
    assert IndexParams("ivfpq", nlist=1, m=2, nbits=8, train_size=256).resolve(300, 8).nbits == 8


def test_nbits_is_at_most_16_bits_per_code():
    with pytest.raises(ValueError, match=r"--nbits \(nbits\) must be at most 16 \(bits per PQ code\), got 17"):
        IndexParams("ivfpq", nbits=17)
    assert IndexParams("ivfpq", nbits=16).nbits == 16


def test_the_default_nlist_keeps_39_training_vectors_per_cell_of_the_sample():
    """With a training sample smaller than the images, the default cell count follows the sample."""
    resolved = IndexParams("ivf", train_size=100).resolve(10_000, 8)
    assert (resolved.nlist, resolved.train_size, resolved.nprobe) == (2, 100, 1)


@pytest.mark.parametrize("name", ["nlist", "nprobe", "m", "nbits", "train_size"])
def test_zero_is_no_count_of_cells_codes_or_vectors(name: str):
    """0 is refused when given, never read as 'the default' (train_size) nor searched as such (nprobe 0 probes no
    cell and finds nothing)."""
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer or None \(default\), got 0\."):
        IndexParams("ivfpq", **{name: 0})
