"""Classification targets (`data.targets`) and the target dataset (`data.target_dataset`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrdistill.data.dataset import collate
from cxrdistill.data.target_dataset import TargetDataset, kept_entries, selection_report
from cxrdistill.data.targets import ClassificationTask
from cxrdistill.errors import ConfigError, CxrDistillError
from cxrdistill.pseudo.top_kappa import TopKappaSelection

NAMES = ["a", "b", "c"]


def test_tasks_encode_image_labels():
    both, none = np.array([0, 1, 1], np.float32), np.zeros(3, np.float32)
    multi = ClassificationTask(NAMES, "multi_label")
    assert multi.encode(both, 1).tolist() == [0, 1, 1] and multi.kappa_mode == "multi"
    single = ClassificationTask(NAMES, "single_label", normal_class=True)
    assert single.output_names == ["a", "b", "c", "(no finding)"] and single.kappa_mode == "single"
    assert single.encode(both, 1).tolist() == [0, 1, 0, 0]  # first present class
    assert single.encode(none, 1).tolist() == [0, 0, 0, 1]
    with pytest.raises(CxrDistillError, match="image 7: has no class"):
        ClassificationTask(NAMES, "single_label", normal_class=False).encode(none, 7)
    anyf = ClassificationTask(NAMES, "any_finding")
    assert anyf.output_names == ["(no finding)", "abnormal"]
    assert anyf.encode(both, 1).tolist() == [0, 1] and anyf.encode(none, 1).tolist() == [1, 0]
    with pytest.raises(ConfigError, match="unknown task"):
        ClassificationTask(NAMES, "ordinal")  # type: ignore[arg-type]


def test_batch_encoding_names_the_image_it_cannot_encode():
    labels = torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 0, 1]])
    single = ClassificationTask(NAMES, "single_label")
    assert single.encode_batch(labels, [5, 6, 7]).tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    assert ClassificationTask(NAMES, "any_finding").encode_batch(labels, [5, 6, 7]).tolist() == \
        [[0, 1], [1, 0], [0, 1]]
    with pytest.raises(CxrDistillError, match="image 6: has no class"):
        ClassificationTask(NAMES, "single_label", normal_class=False).encode_batch(labels, [5, 6, 7])
    assert [ClassificationTask(NAMES, t).name for t in ("multi_label", "single_label", "any_finding")] == \
        ["multi_label", "single_label+normal", "any_finding"]


def test_single_label_loss_ignores_rows_outside_the_mask():
    task = ClassificationTask(["a", "b"], "single_label", normal_class=False)
    logits = torch.tensor([[5.0, -5.0], [5.0, -5.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    only_first = task.loss(logits, targets, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    both = task.loss(logits, targets, torch.ones(2, 2))
    assert only_first < 1e-3 < both
    assert both == pytest.approx(float(torch.nn.functional.cross_entropy(logits, targets)) , rel=1e-6)


def test_multi_label_loss_is_bce_over_kept_entries_and_probabilities_are_sigmoid():
    task = ClassificationTask(["a", "b"], "multi_label")
    logits = torch.tensor([[2.0, -1.0]])
    kept_a = task.loss(logits, torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    assert kept_a == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(-2.0))), rel=1e-6)
    assert torch.allclose(task.probabilities(logits), torch.sigmoid(logits))
    assert torch.allclose(ClassificationTask(NAMES, "any_finding").probabilities(logits).sum(1), torch.ones(1))


class _Images:
    """A stand-in `CXRDataset`: records with ids, and samples with an image."""

    class _Manifest:
        def image_labels(self, image_id: int) -> np.ndarray:
            return np.array([[1, 0, 0], [0, 0, 0], [0, 1, 1], [0, 0, 1]][image_id - 100], np.float32)

    def __init__(self) -> None:
        self.images = [type("Rec", (), {"id": 100 + k})() for k in range(4)]
        self.manifest = self._Manifest()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, row: int) -> dict:
        return {"image": torch.full((1, 2, 2), float(row)), "image_labels": torch.zeros(3), "has_boxes": False,
                "has_image_labels": False, "image_id": self.images[row].id, "boxes": torch.zeros(0, 4),
                "labels": torch.zeros(0, dtype=torch.int64), "report": ""}


def test_pseudo_set_holds_the_kept_images_with_their_kept_entries_and_collates():
    base = _Images()
    task = ClassificationTask(NAMES, "multi_label")
    ids = [103, 101, 100, 102]  # selection rows in the order of the teacher's prediction pass
    keep = torch.tensor([[True, False, False], [False, False, False], [False, True, True], [True, True, False]])
    labels = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 1]])
    selection = TopKappaSelection(keep=keep, labels=labels, counts=torch.tensor([1, 2, 0]))
    pseudo = TargetDataset.pseudo(base, ids, selection, task)
    assert pseudo.image_ids() == [103, 100, 102]  # image 101 has no kept entry
    batch = collate([pseudo[i] for i in range(len(pseudo))])
    assert batch["image_id"].tolist() == [103, 100, 102]
    assert batch["mask"].tolist() == [[1, 0, 0], [0, 1, 1], [1, 1, 0]]
    assert batch["target"].tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    report = selection_report(base, ids, selection, task, kappa=0.5, soft=False)
    assert report["n_images_kept"] == 3 and report["kept_per_output"] == {"a": 1, "b": 2, "c": 0}
    # kept entries vs the hidden labels: 103:a=0≠1, 100:b=0≠1 c=0=0, 102:a=0=0 b=1=1 -> 3 of 5 agree
    assert report["agreement_with_hidden_labels"] == pytest.approx(3 / 5)
    single = TopKappaSelection(keep=torch.tensor([True, False]), labels=torch.eye(2), counts=torch.tensor([1, 0]))
    assert kept_entries(single, 2).tolist() == [[True, True], [False, False]]


def test_labeled_set_encodes_every_image_and_gives_class_proportions():
    labeled = TargetDataset.labeled(_Images(), ClassificationTask(NAMES, "single_label"))
    assert labeled.targets.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]]
    assert bool(labeled.masks.eq(1).all())
    assert labeled.class_proportions().tolist() == [0.25, 0.25, 0.25, 0.25]
    empty = TargetDataset(_Images(), [], torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.raises(CxrDistillError, match="labeled set is empty"):
        empty.class_proportions()
