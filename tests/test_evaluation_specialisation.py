"""What each expert learned: share tables, entropy, mutual information and lift on hand-made tables,
the sentences about them, and the routing share figure from 2 to 1,000 classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

LN2 = 0.6931471805599453  # log 2
LN4 = 1.3862943611198906  # log 4


def test_class_expert_share_pools_each_class_images_mass_and_leaves_empty_classes_at_zero():
    from mgmoe_ds.evaluation.specialisation import class_expert_share

    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    mass = torch.tensor([[1.0, 0.0], [0.5, 0.5],  # class 0: (1.5, 0.5) / 2
                         [0.0, 1.0], [0.0, 1.0], [0.5, 0.5],  # class 1: (0.5, 2.5) / 3
                         [0.6, 0.2]])  # class 2: one image with a dropped choice, (0.6, 0.2) / 0.8
    share = class_expert_share(labels, mass, num_classes=4)  # class 3 has no images
    expected = torch.tensor([[0.75, 0.25], [1 / 6, 5 / 6], [0.75, 0.25], [0.0, 0.0]], dtype=torch.float64)
    assert share.shape == (4, 2)
    assert torch.allclose(share, expected, atol=1e-12)
    with pytest.raises(ValueError, match="labels must be"):
        class_expert_share(labels, mass[:5], num_classes=4)


def test_layer_specialisation_on_a_three_class_two_expert_table_computed_by_hand():
    from mgmoe_ds.evaluation.specialisation import layer_specialisation

    share = torch.tensor([[0.75, 0.25], [0.25, 0.75], [0.5, 0.5]])
    images = torch.tensor([2, 1, 1])  # p(class) = 1/2, 1/4, 1/4
    result = layer_specialisation(share, images, ["a", "b", "c"], ["0:x", "1:y"], top=2)
    json.dumps(result, allow_nan=False)  # JSON-serialisable, no NaN or infinity
    # u(x) = 1/2 * 3/4 + 1/4 * 1/4 + 1/4 * 1/2 = 0.5625, u(y) = 0.4375
    assert result["utilisation"] == {"0:x": pytest.approx(0.5625), "1:y": pytest.approx(0.4375)}
    # max / min = 9 / 7; population std of (0.5625, 0.4375) is 0.0625 around the mean 0.5
    assert result["utilisation_spread"]["max_over_min"] == pytest.approx(9 / 7)
    assert result["utilisation_spread"]["coefficient_of_variation"] == pytest.approx(0.125)
    # H(3/4, 1/4) = 0.5623351 nats, H(1/2, 1/2) = log 2: 3/4 * 0.5623351 + 1/4 * 0.6931472 = 0.5950382
    assert result["class_expert_entropy"]["nats"] == pytest.approx(0.5950381536)
    assert result["class_expert_entropy"]["normalised"] == pytest.approx(0.5950381536 / LN2)
    # H(0.5625, 0.4375) = 0.6853142 nats; MI = 0.6853142 - 0.5950382
    assert result["mutual_information"] == pytest.approx(0.0902760537)
    assert result["max_mutual_information"] == pytest.approx(LN2)
    # lift on y: b 0.75 / 0.4375 = 1.714, c 0.5 / 0.4375 = 1.143 (a, 0.571, is cut by top=2)
    assert result["top_classes"]["1:y"] == [
        {"species": "b", "share": 0.75, "lift": pytest.approx(1.7142857), "images": 1},
        {"species": "c", "share": 0.5, "lift": pytest.approx(1.1428571), "images": 1}]
    assert [row["species"] for row in result["top_classes"]["0:x"]] == ["a", "c"]  # 1.333, 0.889
    assert result["summary"] == [
        "expert 0:x is general: no species sends it more than 1.3x its average share (56%)",
        "expert 1:y is general: no species sends it more than 1.7x its average share (44%)"]


def test_a_perfectly_specialised_balanced_table_has_entropy_0_and_mutual_information_log_e():
    from mgmoe_ds.evaluation.specialisation import layer_specialisation

    share = torch.zeros(8, 4)
    share[torch.arange(8), torch.arange(8) // 2] = 1.0  # classes 2e and 2e + 1 go wholly to expert e
    names = [f"s{c}" for c in range(8)]
    result = layer_specialisation(share, torch.full((8,), 50), names, ["0", "1", "2", "3"])
    assert result["class_expert_entropy"] == {"nats": 0.0, "normalised": 0.0}
    assert result["mutual_information"] == pytest.approx(LN4)
    assert result["utilisation_spread"] == {"max_over_min": pytest.approx(1.0), "coefficient_of_variation": 0.0}
    assert result["summary"][0] == ("expert 0 specialises: 2 species (s0, s1) send it 100% of their routing mass, "
                                    "4.0x its average share (25%)")
    assert result["summary"][3].startswith("expert 3 specialises: 2 species (s6, s7)")


def test_the_uniform_table_has_entropy_1_mutual_information_0_and_only_general_experts():
    from mgmoe_ds.evaluation.specialisation import layer_specialisation

    share = torch.full((5, 4), 0.25)
    result = layer_specialisation(share, torch.tensor([10, 20, 30, 40, 50]), list("abcde"), ["0", "1", "2", "3"])
    assert result["class_expert_entropy"]["normalised"] == pytest.approx(1.0)
    assert result["class_expert_entropy"]["nats"] == pytest.approx(LN4)
    assert result["mutual_information"] == pytest.approx(0.0, abs=1e-12)
    assert result["summary"] == [f"expert {e} is general: no species sends it more than 1.0x its average share (25%)"
                                 for e in range(4)]


def test_a_class_with_few_images_does_not_make_an_expert_a_specialist():
    from mgmoe_ds.evaluation.specialisation import layer_specialisation

    # class a sends everything to expert 0; b's row makes every utilisation exactly 1/4:
    # u(0) = (1 * 1 + 99 * 24/99) / 100 = 0.25, u(e) = 99 * 25/99 / 100 = 0.25
    share = torch.tensor([[1.0, 0.0, 0.0, 0.0], [24 / 99, 25 / 99, 25 / 99, 25 / 99]], dtype=torch.float64)
    experts = ["0", "1", "2", "3"]
    # one image: lift 4, but the excess 0.75 is under 3 chance errors, 3 * sqrt(1/4 * 3/4 / 1) = 1.30
    noisy = layer_specialisation(share, torch.tensor([1, 99]), ["a", "b"], experts)
    assert noisy["summary"][0] == ("expert 0 is general: the species that send it 2x its average share (25%) or more "
                                   "(highest 4.0x) have too few images to tell from chance")
    # 100 images: 3 * sqrt(3/16 / 100) = 0.13 < 0.75
    clear = layer_specialisation(share, torch.tensor([100, 9900]), ["a", "b"], experts)
    assert clear["summary"][0] == ("expert 0 specialises: 1 species (a) sends it 100% of their routing mass, "
                                   "4.0x its average share (25%)")
    assert clear["summary"][1] == "expert 1 is general: no species sends it more than 1.0x its average share (25%)"


def test_an_expert_below_one_percent_of_uniform_is_called_unused():
    from mgmoe_ds.evaluation.specialisation import layer_specialisation

    share = torch.tensor([[0.496, 0.5, 0.004], [0.5, 0.5, 0.0]], dtype=torch.float64)
    result = layer_specialisation(share, torch.tensor([10, 10]), ["a", "b"], ["0", "1", "2"])
    # u(2) = (0.004 + 0) / 2 = 0.002, under 1% of the uniform 1/3 (0.0033)
    assert result["summary"][2] == "expert 2 is unused: it gets 0.20% of the routing mass (uniform would be 33%)"
    silent = layer_specialisation(share * torch.tensor([1.0, 1.0, 0.0]) / torch.tensor([[0.996], [1.0]]),
                                  torch.tensor([10, 10]), ["a", "b"], ["0", "1", "2"])
    assert silent["utilisation_spread"]["max_over_min"] is None  # min is 0: no finite ratio
    assert silent["summary"][2] == "expert 2 is unused: it gets 0.00% of the routing mass (uniform would be 33%)"
    json.dumps(silent, allow_nan=False)


def test_switching_an_expert_off_is_a_cost_a_gain_or_a_tie_against_one_standard_error():
    from mgmoe_ds.evaluation.specialisation import binomial_standard_error, switch_off_words

    assert binomial_standard_error(0.8, 400) == pytest.approx(0.02)  # sqrt(0.8 * 0.2 / 400)
    lines = switch_off_words(0.80, {"0:a": 0.759, "1:b": 0.795, "2:c": 0.83, "3:d": 0.80}, 0.015)
    assert lines == ["switching off expert 0:a costs 4.1 points (SE 1.5)",
                     "switching off expert 1:b is a tie: -0.5 points, within one standard error (SE 1.5)",
                     "switching off expert 2:c gains 3.0 points (SE 1.5)",
                     "switching off expert 3:d is a tie: +0.0 points, within one standard error (SE 1.5)"]


def test_rows_are_ordered_by_dominant_expert_then_by_its_share_with_empty_classes_last():
    from mgmoe_ds.evaluation.figures import order_by_dominant_expert

    share = np.array([[0.2, 0.8],  # 0: expert 1, 0.8
                      [0.9, 0.1],  # 1: expert 0, 0.9
                      [0.0, 0.0],  # 2: no images
                      [0.6, 0.4],  # 3: expert 0, 0.6
                      [0.3, 0.7],  # 4: expert 1, 0.7
                      [0.5, 0.5],  # 5: a tie goes to expert 0, 0.5
                      [0.6, 0.4]])  # 6: as class 3, after it
    assert order_by_dominant_expert(share).tolist() == [1, 3, 6, 5, 0, 4, 2]


def test_the_share_figure_names_1000_species_in_sorted_order_within_the_height_bound(tmp_path):
    from PIL import Image

    from mgmoe_ds.evaluation.figures import MAX_HEIGHT_PIXELS, plot_routing_share

    num_classes, num_experts = 1000, 4
    share = np.zeros((num_classes, num_experts))
    for c in range(num_classes):  # class c goes mostly to expert c % 4, less so as c grows
        top = 0.4 + 0.5 * (1 - c / num_classes)
        share[c] = (1 - top) / 3
        share[c, c % 4] = top
    names = [f"Genus{c:04d} species" for c in range(num_classes)]
    path = tmp_path / "share.png"
    drawn = plot_routing_share(share, names, ["0:a", "1:b", "2:c", "3:d"], "a title", path)
    # expert 0's classes 0, 4, 8, ... (largest share first), then expert 1's 1, 5, 9, ...
    assert drawn == [names[c] for e in range(num_experts) for c in range(e, num_classes, num_experts)]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        width, height = image.size
    assert 2000 < height <= MAX_HEIGHT_PIXELS and width < 1500
    assert path.stat().st_size < 2_000_000


def test_the_share_figure_draws_two_species_and_rejects_mismatched_names(tmp_path):
    from mgmoe_ds.evaluation.figures import plot_routing_share

    share = np.array([[0.1, 0.9], [0.7, 0.3]])
    drawn = plot_routing_share(share, ["a", "b"], ["0", "1"], "two species", tmp_path / "two.png")
    assert drawn == ["b", "a"]  # b's dominant expert is 0
    assert (tmp_path / "two.png").stat().st_size > 0
    with pytest.raises(ValueError, match="3 class names"):
        plot_routing_share(share, ["a", "b", "c"], ["0", "1"], "t", tmp_path / "bad.png")
