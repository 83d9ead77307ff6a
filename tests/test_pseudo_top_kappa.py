import pytest
import torch

from cxrdistill.pseudo.top_kappa import apportion, class_balanced_top_kappa


def _probs(pred, conf, c=3):
    """Rows whose argmax is ``pred`` with confidence ``conf``, the rest spread evenly."""
    pred, conf = torch.tensor(pred), torch.tensor(conf)
    p = ((1 - conf) / (c - 1))[:, None].repeat(1, c)
    p[torch.arange(len(pred)), pred] = conf
    return p


def test_apportion_sums_to_total_in_proportion():
    q = apportion(10, torch.tensor([0.5, 0.3, 0.2]), torch.tensor([100, 100, 100]))
    assert q.tolist() == [5, 3, 2]
    # largest remainder: 7 * (1/3 each) = 2.33 -> 3, 2, 2 (tie goes to the lower class index)
    assert apportion(7, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([9, 9, 9])).tolist() == [3, 2, 2]


def test_single_label_honours_proportions_and_picks_most_confident():
    torch.manual_seed(0)
    n = 100
    pred = [0] * 50 + [1] * 30 + [2] * 20
    conf = torch.rand(n) * 0.5 + 0.4
    probs = _probs(pred, conf.tolist())
    sel = class_balanced_top_kappa(probs, 0.5, torch.tensor([0.6, 0.2, 0.2]))
    assert int(sel.keep.sum()) == 50
    assert sel.counts.tolist() == [30, 10, 10]
    for lo, hi in [(0, 50), (50, 80), (80, 100)]:
        kept, dropped = conf[lo:hi][sel.keep[lo:hi]], conf[lo:hi][~sel.keep[lo:hi]]
        assert kept.min() > dropped.max()  # the most confident of each class
    assert torch.equal(sel.labels, torch.nn.functional.one_hot(probs.argmax(1), 3).float())


def test_ties_are_broken_by_image_index():
    probs = _probs([0] * 6, [0.8] * 6, c=2)
    sel = class_balanced_top_kappa(probs, 0.5, torch.tensor([1.0, 0.0]))
    assert sel.keep.tolist() == [True, True, True, False, False, False]
    again = class_balanced_top_kappa(probs, 0.5, torch.tensor([1.0, 0.0]))
    assert torch.equal(sel.keep, again.keep)


def test_class_with_no_candidates_gives_its_quota_to_the_others():
    # nothing is predicted as class 2, whose labeled share is 20 %
    pred = [0] * 10 + [1] * 10
    conf = [0.9 - 0.01 * i for i in range(10)] * 2
    probs = _probs(pred, conf)
    sel = class_balanced_top_kappa(probs, 0.5, torch.tensor([0.4, 0.4, 0.2]), redistribute=True)
    assert int(sel.keep.sum()) == 10 and sel.counts.tolist() == [5, 5, 0]
    strict = class_balanced_top_kappa(probs, 0.5, torch.tensor([0.4, 0.4, 0.2]))  # the default
    assert strict.counts.tolist() == [4, 4, 0]


def test_strict_paper_rule_keeps_the_labeled_balance_when_the_minority_class_runs_short():
    # labeled shares 5:1, K = 6 -> quotas 5 and 1; the teacher predicts class 0 for only 2 images
    assert apportion(6, torch.tensor([5.0, 1.0]), torch.tensor([2, 6])).tolist() == [2, 1]
    assert apportion(6, torch.tensor([5.0, 1.0]), torch.tensor([2, 6]), redistribute=True).tolist() == [2, 4]
    probs = _probs([0] * 2 + [1] * 6, [0.9] * 8, c=2)
    sel = class_balanced_top_kappa(probs, 0.75, torch.tensor([5.0, 1.0]))  # K = round(0.75 * 8) = 6
    assert sel.counts.tolist() == [2, 1]
    assert class_balanced_top_kappa(probs, 0.75, torch.tensor([5.0, 1.0]), redistribute=True).counts.tolist() == [2, 4]


def test_short_class_keeps_all_and_rest_redistributed_in_proportion():
    pred = [0] * 40 + [1] * 40 + [2] * 2
    probs = _probs(pred, [0.7] * 82)
    sel = class_balanced_top_kappa(probs, 0.5, torch.tensor([0.25, 0.25, 0.5]), redistribute=True)
    # K = 41: quotas 10/10/21 -> class 2 keeps its 2, the 19 left split 10/9 -> 20/19/2
    assert sel.counts.tolist() == [20, 19, 2]


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_kappa_one_keeps_all_and_zero_keeps_none(mode):
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(37, 4), 1) if mode == "single" else torch.rand(37, 4)
    props = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert bool(class_balanced_top_kappa(probs, 1.0, props, mode=mode, redistribute=True).keep.all())
    assert not bool(class_balanced_top_kappa(probs, 0.0, props, mode=mode).keep.any())


def test_multi_label_keeps_confident_positives_and_negatives_in_prevalence():
    p = torch.tensor([0.99, 0.95, 0.9, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05, 0.01])
    probs = torch.stack([p, p.flip(0)], dim=1)  # class 1 has the same values in reverse order
    sel = class_balanced_top_kappa(probs, 0.4, torch.tensor([0.25, 0.5]), mode="multi")
    assert sel.keep.shape == (10, 2)
    # class 0: K = 4, 1 positive (0.99) and 3 negatives (0.01, 0.05, 0.1)
    assert sel.keep[:, 0].nonzero().flatten().tolist() == [0, 7, 8, 9]
    # class 1: 2 positives (0.99, 0.95 at rows 9, 8), 2 negatives (0.01, 0.05 at rows 0, 1)
    assert sel.keep[:, 1].nonzero().flatten().tolist() == [0, 1, 8, 9]
    assert sel.counts.tolist() == [1, 2]
    assert sel.labels[:, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    soft = class_balanced_top_kappa(probs, 0.4, torch.tensor([0.25, 0.5]), mode="multi", soft=True)
    assert torch.equal(soft.labels, probs) and torch.equal(soft.keep, sel.keep)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="kappa"):
        class_balanced_top_kappa(torch.full((3, 2), 0.5), 1.5, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="row 1"):
        class_balanced_top_kappa(torch.tensor([[0.5, 0.5], [1.2, -0.2]]), 0.5, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="class_proportions"):
        class_balanced_top_kappa(torch.full((3, 2), 0.5), 0.5, torch.tensor([1.0]))
