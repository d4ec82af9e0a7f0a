"""k-means refined by nearest neighbours (curriculum.clustering = "kmeans+knn"), the exact
neighbour search behind it, cluster purity, and what the training pass and checkpoints keep of it."""

import io
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from mgmoe_ds.config import RunConfig
from mgmoe_ds.curriculum import ClusterState
from mgmoe_ds.curriculum import refinement
from mgmoe_ds.curriculum.clustering import ClusteringRecord
from mgmoe_ds.curriculum.refinement import (cluster_purity, faiss_neighbours, knn_refine, nearest_neighbours,
                                            torch_neighbours)

# Two tight blobs far apart and a point halfway between them.
BLOB_A = [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.1), (0.5, 0.5), (1.4, 0.6)]  # rows 0-5
BLOB_B = [(10.0, 0.0), (10.0, 1.0), (9.1, 0.0), (9.0, 0.9), (9.5, 0.5), (8.5, 0.5)]  # rows 6-11
HALFWAY = (5.0, 0.5)  # row 12
POINTS = torch.tensor(BLOB_A + BLOB_B + [HALFWAY])  # (13, 2)
# The k-means clusters, by hand: row 4 sits in the middle of blob A but is put in cluster 1.
KMEANS = torch.tensor([0, 0, 0, 0, 1, 0] + [1] * 6 + [0])
# The 4 nearest other rows, worked out by hand from the coordinates:
#   0: 4, 1, 2, 3     1: 4, 0, 3, 2     2: 4, 5, 0, 3     3: 5, 4, 1, 2     5: 3, 2, 4, 1
#     -> each of them has row 4 (cluster 1) and three rows of cluster 0 among its neighbours: 3 of 4 votes
#   4: 0, 1, 2, 3 -> 4 of 4 votes for cluster 0
#   6-11: four rows of blob B each -> 4 of 4 for cluster 1
#   12: 11 (3.5 away), 5 (3.60), 9 (4.02), 2 (4.03); 3 is next at 4.045 -> 2 votes each for clusters 0 and 1


def _without_faiss(monkeypatch):
    monkeypatch.setattr(refinement, "_faiss", lambda: None)


@pytest.fixture(params=["torch", "faiss"])
def search(request, monkeypatch):
    """Runs a test with the torch search, and again with faiss where it is installed."""
    if request.param == "faiss":
        pytest.importorskip("faiss")
    else:
        _without_faiss(monkeypatch)
    return request.param


def test_a_misassigned_point_moves_to_its_neighbours_cluster_and_a_point_between_blobs_is_an_outlier(search):
    refined, outlier = knn_refine(POINTS, KMEANS, num_clusters=2, k=4, agreement=0.6)
    assert refined.tolist() == [0, 0, 0, 0, 0, 0] + [1] * 6 + [0]  # row 4 back in blob A's cluster
    assert outlier.tolist() == [False] * 12 + [True]  # 3 of 4 votes is enough at 0.6; row 12's 2 of 4 is not
    # A share equal to the agreement is enough: at 0.5 row 12 is no outlier.
    assert not knn_refine(POINTS, KMEANS, 2, 4, 0.5)[1].any()
    # At 0.8, the rows with 3 of 4 votes are outliers too; row 4 and blob B (4 of 4) are not.
    outliers = [True, True, True, True, False, True] + [False] * 6 + [True]
    assert knn_refine(POINTS, KMEANS, 2, 4, 0.8)[1].tolist() == outliers


def test_a_tie_goes_to_the_points_own_cluster_else_to_the_lowest_id(search):
    # Row 12's votes tie 2 : 2 between clusters 0 and 1.
    own_one = KMEANS.clone()
    own_one[12] = 1
    assert knn_refine(POINTS, own_one, 2, 4, 0.6)[0][12] == 1
    own_two = KMEANS.clone()
    own_two[12] = 2  # a third cluster that none of its neighbours is in
    refined, outlier = knn_refine(POINTS, own_two, 3, 4, 0.6)
    assert refined[12] == 0 and outlier[12]


def test_refining_some_rows_against_all_gives_those_rows_of_the_full_refinement(search):
    full_refined, full_outlier = knn_refine(POINTS, KMEANS, 2, 4, 0.8)
    refined, outlier = knn_refine(POINTS, KMEANS, 2, 4, 0.8, rows=range(3, 9))  # a rank's rows 3-8
    assert refined.tolist() == full_refined[3:9].tolist() and outlier.tolist() == full_outlier[3:9].tolist()


def test_with_fewer_points_than_k_all_other_points_vote_and_a_lone_point_keeps_its_cluster():
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]])
    refined, outlier = knn_refine(points, torch.tensor([0, 1, 1]), 2, k=10, agreement=0.6)
    # row 0: rows 1 and 2 vote, both cluster 1; row 1: clusters 0 and 1 tie -> its own (1), share 1/2
    assert refined.tolist() == [1, 1, 1] and outlier.tolist() == [False, True, True]
    alone = knn_refine(torch.zeros(1, 2), torch.tensor([1]), 2, k=10, agreement=0.6)
    assert alone[0].tolist() == [1] and alone[1].tolist() == [False]


def _brute_force(queries: torch.Tensor, database: torch.Tensor, k: int, own_rows=None) -> torch.Tensor:
    """The k nearest database rows by sorting every distance, in the test's own arithmetic."""
    distances = ((queries[:, None, :] - database[None, :, :]) ** 2).sum(-1)  # (M, N)
    if own_rows is not None:
        distances[torch.arange(queries.shape[0]), own_rows] = float("inf")
    return distances.argsort(dim=1)[:, :k]


def test_the_torch_search_in_blocks_finds_the_brute_force_neighbours():
    g = torch.Generator().manual_seed(0)
    database = torch.randn(50, 5, generator=g, dtype=torch.float64)
    others = torch.randn(9, 5, generator=g, dtype=torch.float64)
    # blocks of 7 query rows: a block never holds all 50 x 50 distances
    found = torch_neighbours(others, database, 6, block_rows=7)
    assert torch.equal(found, _brute_force(others, database, 6))
    found = torch_neighbours(database, database, 6, exclude_self=True, block_rows=7)
    assert torch.equal(found, _brute_force(database, database, 6, torch.arange(50)))
    assert not (found == torch.arange(50)[:, None]).any()
    # rows 10-29 as the queries, each one not its own neighbour
    found = torch_neighbours(database[10:30], database, 6, exclude_self=True, query_offset=10, block_rows=7)
    assert torch.equal(found, _brute_force(database[10:30], database, 6, torch.arange(10, 30)))


def test_faiss_finds_the_same_neighbours_as_the_torch_search():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    database = torch.randn(200, 8, generator=g)
    queries = torch.randn(30, 8, generator=g)
    assert torch.equal(faiss_neighbours(queries, database, 5), torch_neighbours(queries, database, 5, block_rows=16))
    mine = faiss_neighbours(database[40:90], database, 5, exclude_self=True, query_offset=40)
    assert torch.equal(mine, torch_neighbours(database[40:90], database, 5, exclude_self=True, query_offset=40))
    assert torch.equal(nearest_neighbours(queries, database, 5), faiss_neighbours(queries, database, 5))


def test_faiss_leaves_a_query_out_of_its_neighbours_when_a_duplicate_comes_back_first():
    pytest.importorskip("faiss")
    # rows 0-3 equal: asked for 3, faiss returns 3 of the 4, which for some row are not its own
    database = torch.tensor([[0.0, 0.0]] * 4 + [[1.0, 0.0], [3.0, 0.0]])
    found = faiss_neighbours(database, database, 2, exclude_self=True)
    assert found.shape == (6, 2)
    assert all(i not in row for i, row in enumerate(found.tolist()))
    assert all(set(row) <= {0, 1, 2, 3} for row in found[:4].tolist())  # its duplicates, at distance 0


def test_a_k_the_database_cannot_give_is_refused():
    with pytest.raises(ValueError, match=r"k = 3, expected 1 to 2"):
        nearest_neighbours(torch.zeros(1, 2), torch.zeros(3, 2), 3, exclude_self=True)


def test_purity_by_hand():
    assignment = torch.tensor([0, 0, 0, 1, 1, 2])
    labels = torch.tensor([5, 5, 3, 3, 3, 1])
    per_cluster, overall = cluster_purity(assignment, labels, num_clusters=4)
    # cluster 0: classes 5, 5, 3 -> 2/3; cluster 1: 3, 3 -> 1; cluster 2: 1 -> 1; cluster 3 is empty
    assert per_cluster[:3].tolist() == pytest.approx([2 / 3, 1.0, 1.0]) and per_cluster[3].isnan()
    assert overall == pytest.approx(5 / 6)  # 2 + 2 + 1 of 6 images in their cluster's majority class
    kept = torch.tensor([True, True, False, True, True, True])  # without the image of class 3 in cluster 0
    per_cluster, overall = cluster_purity(assignment, labels, 4, kept)
    assert per_cluster[:3].tolist() == [1.0, 1.0, 1.0] and overall == 1.0
    # as if two ranks held the same images: the counts double, the shares stay
    doubled = cluster_purity(assignment, labels, 4, num_classes=6, all_reduce=lambda t: 2 * t)
    assert doubled[0][:3].tolist() == pytest.approx([2 / 3, 1.0, 1.0]) and doubled[1] == pytest.approx(5 / 6)


# -- the training pass ------------------------------------------------------------------------


def hand_made_passes(clustering: str):
    """``TrainingPasses`` in a world of one whose training images are the hand-made points (labels:
    blob A class 0, blob B class 1, the halfway point class 2) and whose validation images are the
    blobs' centres."""
    from mgmoe_ds.train.distributed import Collectives
    from mgmoe_ds.train.passes import TrainingPasses

    class HandMadePasses(TrainingPasses):
        def labelled_features(self, stage):
            return POINTS.clone(), torch.tensor([0] * 6 + [1] * 6 + [2])

        def val_expert_stats(self, stage):
            return torch.tensor([[0.6, 0.5], [9.3, 0.5]]), torch.tensor([[-1.0, -2.0], [-2.0, -1.0]])

    run = RunConfig()
    config = replace(run, curriculum=replace(run.curriculum, num_clusters=2, clustering=clustering, knn_neighbours=4,
                                             knn_agreement=0.6))
    cpu = torch.device("cpu")
    return HandMadePasses(config, SimpleNamespace(num_classes=3), None, None, Collectives(cpu), device=cpu,
                          input_dtype=torch.float32)


def _blob_means() -> torch.Tensor:
    return torch.stack([torch.tensor(BLOB_A).mean(0), torch.tensor(BLOB_B).mean(0)])  # (2, 2)


def test_the_training_pass_refines_its_clusters_and_leaves_outliers_out_of_the_centroids(world_of_one):
    state = hand_made_passes("kmeans+knn").clusters(None, seed=0)
    blob_a = int(state.centroids[:, 0].argmin())  # which cluster id k-means gave blob A
    order = [blob_a, 1 - blob_a]
    torch.testing.assert_close(state.centroids[order], _blob_means())  # the halfway point is left out
    assert state.train_counts.tolist() == [6.0, 6.0]
    record = state.clustering.to_json()
    assert record["method"] == "kmeans+knn" and record["neighbours"] == 4 and record["agreement"] == 0.6
    assert record["outliers"] == 1
    assert sorted(record["sizes_kmeans"]) == [6, 7]  # k-means put the halfway point in one of the blobs
    assert sorted(record["purity_kmeans"]["per_cluster"]) == [round(6 / 7, 4), 1.0]
    assert record["purity_kmeans"]["overall"] == round(12 / 13, 4)
    assert record["sizes_refined"] == [6, 6]
    assert record["purity_refined"] == {"overall": 1.0, "per_cluster": [1.0, 1.0]}
    assert state.to_json()["clustering"] == record


def test_plain_kmeans_records_its_purity_and_keeps_every_point(world_of_one):
    state = hand_made_passes("kmeans").clusters(None, seed=0)
    seven = int(state.train_counts.argmax())  # the cluster that took the halfway point
    assert sorted(state.train_counts.tolist()) == [6.0, 7.0]
    blob = 0 if state.centroids[seven, 0] < 5 else 1
    with_halfway = torch.cat([torch.tensor(BLOB_A if blob == 0 else BLOB_B), torch.tensor([HALFWAY])]).mean(0)
    torch.testing.assert_close(state.centroids[seven], with_halfway)  # k-means' mean, the halfway point in it
    record = state.clustering.to_json()
    assert record["method"] == "kmeans" and "outliers" not in record and "purity_refined" not in record
    assert record["purity_kmeans"]["overall"] == round(12 / 13, 4)


def test_all_gather_rows_at_world_size_one_returns_the_input(world_of_one):
    from mgmoe_ds.train.distributed import Collectives

    comm = Collectives(torch.device("cpu"))
    rows = torch.arange(6.0).view(3, 2)  # (3, 2)
    assert torch.equal(comm.all_gather_rows(rows), rows)
    assert torch.equal(comm.all_gather_rows(torch.tensor([[4], [1]])), torch.tensor([[4], [1]]))  # int64 too
    assert comm.all_gather_rows(torch.zeros(0, 2)).shape == (0, 2)


# -- checkpoints and the stage JSON ------------------------------------------------------------


def _state(record=None) -> ClusterState:
    return ClusterState(centroids=torch.tensor([[0.0, 0.0], [10.0, 0.0]]),
                        teacher=torch.tensor([[0.7, 0.3], [0.2, 0.8]]), scores=torch.tensor([[-1.0, -2.0], [-2.0, -1.0]]),
                        val_counts=torch.tensor([3.0, 4.0]),
                        train_counts=torch.tensor([6.0, 6.0]), clustering=record)


KNN_RECORD = ClusteringRecord("kmeans+knn", torch.tensor([7.0, 6.0]), torch.tensor([6 / 7, 1.0]), 12 / 13,
                              neighbours=4, agreement=0.6, outliers=torch.tensor([1.0, 0.0]),
                              refined_sizes=torch.tensor([6.0, 0.0]),
                              refined_purity=torch.tensor([1.0, float("nan")]), refined_overall_purity=1.0)


def _through_a_checkpoint(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save({"clusters": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["clusters"]  # as checkpoints.read_run_state reads it


@pytest.mark.parametrize("record", [None, ClusteringRecord("kmeans", torch.tensor([7.0, 6.0]),
                                                           torch.tensor([6 / 7, 1.0]), 12 / 13), KNN_RECORD])
def test_cluster_state_with_or_without_its_clustering_record_round_trips_through_a_checkpoint(record):
    state = _state(record)
    again = ClusterState.from_state_dict(_through_a_checkpoint(state.state_dict()))
    assert again.to_json() == state.to_json()
    assert all(torch.equal(getattr(again, k), getattr(state, k))
               for k in ("centroids", "teacher", "scores", "val_counts", "train_counts"))


def test_a_checkpoint_from_before_the_clustering_record_still_loads():
    old = {k: v for k, v in _state(KNN_RECORD).state_dict().items() if k != "clustering"}  # as written before
    again = ClusterState.from_state_dict(_through_a_checkpoint(old))
    assert again.clustering is None and again.to_json()["clustering"] is None
    assert torch.equal(again.centroids, old["centroids"])


def test_the_stage_json_says_how_the_clusters_were_made_and_how_pure_they_are():
    assert _state(KNN_RECORD).to_json()["clustering"] == {
        "method": "kmeans+knn", "sizes_kmeans": [7, 6],
        "purity_kmeans": {"overall": 0.9231, "per_cluster": [0.8571, 1.0]},
        "neighbours": 4, "agreement": 0.6, "outliers": 1, "outliers_per_kmeans_cluster": [1, 0],
        "sizes_refined": [6, 0], "purity_refined": {"overall": 1.0, "per_cluster": [1.0, None]},  # empty: null
    }
