"""COCO-style detection AP at any IoU thresholds: a fast vectorised evaluator and pycocotools.

:func:`coco_evaluate` re-implements pycocotools' ``COCOeval`` (bbox) in numpy and gives the same
``precision`` (T, R, K, A, M) and ``recall`` (T, K, A, M) arrays, bit for bit (tests check it):

- per (image, class), detections sorted by score (stable) and cut at ``max(max_dets)``;
- IoU of ``xywh`` boxes; for a crowd GT the union is the detection's area;
- greedy matching in score order: each detection takes the unmatched GT with the highest IoU
  ≥ threshold (ties: the later GT), preferring GTs that are not ignored; crowd GTs are ignored and
  may match many detections; a GT is ignored outside the area range (GT ``area`` field); an
  unmatched detection outside the area range is ignored;
- per class, detections of all images merged by score; precision made monotone; sampled at 101
  recall points. A class with no (non-ignored) GT has precision -1: its AP is *undefined* (NaN).

The work is split in :func:`match_detections` (per image, done once) and :func:`accumulate`
(per image set), so a bootstrap over images (see ``compare.py``) re-uses the matching.
:func:`pycocotools_evaluate` runs the reference implementation with the same parameters.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrdistill.eval.predictions import GroundTruth

__all__ = [
    "CocoParams",
    "MatchTable",
    "CocoResult",
    "match_detections",
    "accumulate",
    "coco_evaluate",
    "pycocotools_evaluate",
    "detection_summary",
    "OXNET_IOUS",
    "CEIRD_IOUS",
    "COCO_IOUS",
]

COCO_IOUS: tuple[float, ...] = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())
OXNET_IOUS: tuple[float, ...] = tuple(np.round(np.arange(0.40, 0.751, 0.05), 2).tolist())  # mean AP40:5:75
CEIRD_IOUS: tuple[float, ...] = (0.25, 0.5, 0.75)
_AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e5**2), "small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e5**2)}


@dataclass(frozen=True)
class CocoParams:
    """Evaluation parameters (pycocotools ``Params`` for ``iouType='bbox'``)."""

    iou_thresholds: tuple[float, ...] = COCO_IOUS
    max_dets: tuple[int, ...] = (1, 10, 100)
    area_ranges: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(_AREA_RANGES))

    @property
    def rec_thresholds(self) -> np.ndarray:
        """The 101 recall points 0, 0.01, ..., 1 (same expression as pycocotools)."""
        return np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


@dataclass
class MatchTable:
    """Per-detection match results of every image (detections kept: rank < max(max_dets)).

    dt_*: ``(Nd,)`` arrays — image index, class index, score, rank within its (image, class) by
    score; ``dt_matched`` / ``dt_ignored``: ``bool (A, T, Nd)``. ``gt_counts``: ``int (A, N_img, K)``,
    the number of non-ignored GT boxes per area range, image and class.
    """

    n_images: int
    n_classes: int
    dt_image: np.ndarray
    dt_class: np.ndarray
    dt_score: np.ndarray
    dt_rank: np.ndarray
    dt_matched: np.ndarray
    dt_ignored: np.ndarray
    gt_counts: np.ndarray
    params: CocoParams


@dataclass
class CocoResult:
    """pycocotools-shaped arrays. ``precision``: ``(T, R, K, A, M)``; ``recall``: ``(T, K, A, M)``; -1 = undefined."""

    precision: np.ndarray
    recall: np.ndarray
    params: CocoParams

    def _index(self, iou: float | None, area: str, max_dets: int) -> tuple[Any, int, int]:
        p = self.params
        t: Any = slice(None)
        if iou is not None:
            hits = np.flatnonzero(np.isclose(np.asarray(p.iou_thresholds), iou))
            if not len(hits):
                raise ValueError(f"IoU {iou} was not evaluated; thresholds are {list(p.iou_thresholds)}")
            t = int(hits[0])
        return t, list(p.area_ranges).index(area), list(p.max_dets).index(max_dets)

    def ap(self, iou: float | None = None, area: str = "all", max_dets: int | None = None) -> float:
        """Mean AP over classes (and over all thresholds when ``iou`` is None); NaN when undefined."""
        t, a, m = self._index(iou, area, max_dets or self.params.max_dets[-1])
        s = self.precision[t, :, :, a, m]
        s = s[s > -1]
        return float(np.mean(s)) if s.size else math.nan

    def ap_per_class(self, iou: float | None = None, area: str = "all", max_dets: int | None = None) -> np.ndarray:
        """AP of each class ``(K,)``; NaN for a class without ground truth."""
        t, a, m = self._index(iou, area, max_dets or self.params.max_dets[-1])
        s = self.precision[t, :, :, a, m].reshape(-1, self.precision.shape[2])
        out = np.full(s.shape[1], math.nan)
        for k in range(s.shape[1]):
            v = s[:, k][s[:, k] > -1]
            if v.size:
                out[k] = float(np.mean(v))
        return out

    def ar(self, area: str = "all", max_dets: int | None = None) -> float:
        """Mean recall over thresholds and classes (COCO AR); NaN when undefined."""
        _, a, m = self._index(None, area, max_dets or self.params.max_dets[-1])
        s = self.recall[:, :, a, m]
        s = s[s > -1]
        return float(np.mean(s)) if s.size else math.nan


def _as_arrays(gt: GroundTruth, rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    img_index = {iid: i for i, iid in enumerate(gt.image_ids)}
    cat_index = {cid: k for k, cid in enumerate(gt.category_ids)}
    anns = gt.coco["annotations"]
    return {
        "gt_img": np.array([img_index[a["image_id"]] for a in anns], dtype=np.int64),
        "gt_cat": np.array([cat_index[a["category_id"]] for a in anns], dtype=np.int64),
        "gt_box": np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
        "gt_area": np.array([a["area"] for a in anns], dtype=np.float64),
        "gt_crowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
        "dt_img": np.array([img_index[r["image_id"]] for r in rows], dtype=np.int64),
        "dt_cat": np.array([cat_index[r["category_id"]] for r in rows], dtype=np.int64),
        "dt_box": np.array([r["bbox"] for r in rows], dtype=np.float64).reshape(-1, 4),
        "dt_score": np.array([r["score"] for r in rows], dtype=np.float64),
    }


def _box_iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of xywh boxes as pycocotools' ``bbIou``. dt ``(B, D, 4)``, gt ``(B, G, 4)``, crowd ``(B, G)`` → ``(B, D, G)``."""
    d = dt[:, :, None, :]
    g = gt[:, None, :, :]
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    inter = w * h
    da = d[..., 2] * d[..., 3]
    ga = g[..., 2] * g[..., 3]
    union = np.where(crowd[:, None, :], da, da + ga - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


def _last_argmax(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the last maximum of ``values`` where ``mask`` along the last axis, and whether any."""
    v = np.where(mask, values, -np.inf)[..., ::-1]
    idx = v.shape[-1] - 1 - np.argmax(v, axis=-1)
    return idx, mask.any(axis=-1)


def _bucket(n: np.ndarray) -> np.ndarray:
    """Round counts up to a power of two (≥ 1), to pad groups of similar size together."""
    return (2 ** np.ceil(np.log2(np.maximum(n, 1)))).astype(np.int64)


def match_detections(gt: GroundTruth, rows: Sequence[dict[str, Any]], params: CocoParams | None = None) -> MatchTable:
    """Match detections to ground truth in every (image, class), all thresholds and area ranges at once."""
    p = params or CocoParams()
    arr = _as_arrays(gt, rows)
    n_img, n_cls = len(gt.image_ids), len(gt.category_ids)
    areas = np.array(list(p.area_ranges.values()), dtype=np.float64)  # (A, 2)
    thr = np.minimum(np.asarray(p.iou_thresholds, dtype=np.float64), 1 - 1e-10)  # (T,)
    A, T = len(areas), len(thr)

    # GT: group by (image, class), original order inside a group.
    gkey = arr["gt_img"] * n_cls + arr["gt_cat"]
    gorder = np.lexsort((np.arange(len(gkey)), gkey))
    gkey_s = gkey[gorder]
    gt_out = (arr["gt_area"][None, :] < areas[:, :1]) | (arr["gt_area"][None, :] > areas[:, 1:])  # (A, Ng)
    gt_ig = gt_out | arr["gt_crowd"][None, :]
    gt_counts = np.zeros((A, n_img, n_cls), dtype=np.int64)
    for a in range(A):
        keep = ~gt_ig[a]
        np.add.at(gt_counts[a], (arr["gt_img"][keep], arr["gt_cat"][keep]), 1)

    # Detections: group by (image, class), score descending (stable), cut at max_dets[-1].
    dkey = arr["dt_img"] * n_cls + arr["dt_cat"]
    dorder = np.lexsort((np.arange(len(dkey)), -arr["dt_score"], dkey))
    dkey_s = dkey[dorder]
    dstart_of = np.searchsorted(dkey_s, dkey_s, side="left")
    rank = np.arange(len(dkey_s)) - dstart_of
    keep = rank < p.max_dets[-1]
    dorder, dkey_s, rank = dorder[keep], dkey_s[keep], rank[keep]
    nd = len(dorder)
    dt_area = arr["dt_box"][dorder, 2] * arr["dt_box"][dorder, 3]
    dt_out = (dt_area[None, :] < areas[:, :1]) | (dt_area[None, :] > areas[:, 1:])  # (A, nd)
    dt_matched = np.zeros((A, T, nd), dtype=bool)
    dt_ignored = np.zeros((A, T, nd), dtype=bool)

    keys = np.unique(dkey_s)  # groups without detections have nothing to match
    d_lo = np.searchsorted(dkey_s, keys, "left")
    d_n = np.searchsorted(dkey_s, keys, "right") - d_lo
    g_lo = np.searchsorted(gkey_s, keys, "left")
    g_n = np.searchsorted(gkey_s, keys, "right") - g_lo
    bd, bg = _bucket(d_n), _bucket(g_n) * (g_n > 0)
    for D, G in {(int(x), int(y)) for x, y in zip(bd, bg)}:
        sel = np.flatnonzero((bd == D) & (bg == G))
        B = len(sel)
        dpos = d_lo[sel, None] + np.arange(D)[None, :]  # (B, D) positions in the kept-sorted dt list
        dvalid = np.arange(D)[None, :] < d_n[sel, None]
        dpos = np.where(dvalid, dpos, 0)
        dbox = arr["dt_box"][dorder[dpos]]
        if G == 0:  # no GT: every detection is a false positive unless outside the area range
            flat = dpos[dvalid]
            dt_ignored[:, :, flat] = dt_out[:, None, flat]
            continue
        gpos = g_lo[sel, None] + np.arange(G)[None, :]
        gvalid = np.arange(G)[None, :] < g_n[sel, None]
        gidx = gorder[np.where(gvalid, gpos, 0)]  # (B, G) annotation indices
        crowd = arr["gt_crowd"][gidx] & gvalid
        ious = _box_iou(dbox, arr["gt_box"][gidx], crowd)  # (B, D, G)
        ig = gt_ig[:, gidx]  # (A, B, G)
        taken = np.zeros((A, T, B, G), dtype=bool)
        m_all = np.zeros((A, T, B, D), dtype=bool)
        ig_all = np.zeros((A, T, B, D), dtype=bool)
        for k in range(D):
            iou = ious[:, k, :]  # (B, G)
            cand = (gvalid & (iou[None] >= thr[:, None, None]))[None] & (~taken | crowd)  # (A, T, B, G)
            i_n, has_n = _last_argmax(iou, cand & ~ig[:, None])
            i_i, has_i = _last_argmax(iou, cand & ig[:, None])
            m = np.where(has_n, i_n, i_i)
            has = (has_n | has_i) & dvalid[None, None, :, k]
            onehot = (np.arange(G) == m[..., None]) & has[..., None]
            taken |= onehot
            m_all[..., k] = has
            ig_all[..., k] = has & np.take_along_axis(np.broadcast_to(ig[:, None], taken.shape), m[..., None], -1)[..., 0]
        flat = dpos[dvalid]
        dt_matched[:, :, flat] = m_all[:, :, dvalid]
        dt_ignored[:, :, flat] = ig_all[:, :, dvalid] | (~m_all[:, :, dvalid] & dt_out[:, None, flat])

    return MatchTable(
        n_images=n_img, n_classes=n_cls, dt_image=arr["dt_img"][dorder], dt_class=arr["dt_cat"][dorder],
        dt_score=arr["dt_score"][dorder], dt_rank=rank, dt_matched=dt_matched, dt_ignored=dt_ignored,
        gt_counts=gt_counts, params=p)


def accumulate(match: MatchTable, images: np.ndarray | None = None, main_only: bool = False) -> CocoResult:
    """Precision / recall over a multiset of images (``images``: image indices, repeats allowed; all by default).

    ``main_only``: fill only area "all" at the largest ``max_dets`` (what mAP needs; for bootstraps).
    """
    p = match.params
    rec_thrs = p.rec_thresholds
    T, R, K, A, M = len(p.iou_thresholds), len(rec_thrs), match.n_classes, len(p.area_ranges), len(p.max_dets)
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    if images is None:
        images = np.arange(match.n_images)
    images = np.asarray(images, dtype=np.int64)

    # Detections of the image multiset, in pycocotools' order: score desc, then image position, then rank.
    by_img = np.argsort(match.dt_image, kind="stable")
    ptr = np.searchsorted(match.dt_image[by_img], np.arange(match.n_images + 1))
    lens = ptr[images + 1] - ptr[images]
    total = int(lens.sum())
    offs = np.repeat(ptr[images] - (np.cumsum(lens) - lens), lens) + np.arange(total)
    idx = by_img[offs]
    pos = np.repeat(np.arange(len(images)), lens)
    order = np.lexsort((match.dt_rank[idx], pos, -match.dt_score[idx]))
    idx = idx[order]
    npig_all = np.tensordot(np.bincount(images, minlength=match.n_images), match.gt_counts, axes=([0], [1]))  # (A, K)

    cls, rank = match.dt_class[idx], match.dt_rank[idx]
    for k in range(K):
        idx_k, rank_k = idx[cls == k], rank[cls == k]
        for a in ([0] if main_only else range(A)):
            npig = npig_all[a, k]
            if npig == 0:
                continue
            for m, max_det in enumerate(p.max_dets):
                if main_only and m != M - 1:
                    continue
                sub = idx_k[rank_k < max_det]
                dtm = match.dt_matched[a][:, sub]
                dtig = match.dt_ignored[a][:, sub]
                tps = dtm & ~dtig
                fps = ~dtm & ~dtig
                tp = np.cumsum(tps, axis=1).astype(float)
                fp = np.cumsum(fps, axis=1).astype(float)
                nd = tp.shape[1]
                if nd == 0:
                    recall[:, k, a, m] = 0
                    precision[:, :, k, a, m] = 0
                    continue
                rc = tp / npig
                pr = tp / (fp + tp + np.spacing(1))
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
                recall[:, k, a, m] = rc[:, -1]
                for t in range(T):
                    inds = np.searchsorted(rc[t], rec_thrs, side="left")
                    ok = inds < nd
                    q = np.zeros(R)
                    q[ok] = pr[t, inds[ok]]
                    precision[t, :, k, a, m] = q
    return CocoResult(precision=precision, recall=recall, params=p)


def coco_evaluate(gt: GroundTruth, rows: Sequence[dict[str, Any]], params: CocoParams | None = None) -> CocoResult:
    """COCO bbox evaluation in numpy (equal to pycocotools; seconds for 10,000 images)."""
    return accumulate(match_detections(gt, rows, params))


def pycocotools_evaluate(gt: GroundTruth, rows: Sequence[dict[str, Any]], params: CocoParams | None = None) -> CocoResult:
    """The reference: pycocotools ``COCOeval`` with the same parameters (slow: python loops)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    p = params or CocoParams()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {k: gt.coco[k] for k in ("images", "annotations", "categories")}
        coco_gt.createIndex()
        if rows:
            coco_dt = coco_gt.loadRes([dict(r) for r in rows])
        else:  # loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt.coco["images"], "categories": gt.coco["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.iouThrs = np.asarray(p.iou_thresholds, dtype=np.float64)
        ev.params.maxDets = list(p.max_dets)
        ev.params.areaRng = [list(v) for v in p.area_ranges.values()]
        ev.params.areaRngLbl = list(p.area_ranges)
        ev.evaluate()
        ev.accumulate()
    return CocoResult(precision=ev.eval["precision"], recall=ev.eval["recall"], params=p)


def _none_if_nan(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def detection_summary(result: CocoResult, class_names: Sequence[str]) -> dict[str, Any]:
    """JSON-ready metrics: mAP over the thresholds, mAP@each IoU, AP-S/M/L, AR, and per-class AP.

    Undefined values (a class without ground truth) are ``None``.
    """
    p = result.params
    out: dict[str, Any] = {
        "iou_thresholds": [float(t) for t in p.iou_thresholds],
        "mAP": _none_if_nan(result.ap()),
        **{f"mAP@{t:g}": _none_if_nan(result.ap(iou=t)) for t in p.iou_thresholds},
        **{f"AP_{a}": _none_if_nan(result.ap(area=a)) for a in p.area_ranges if a != "all"},
        f"AR@{p.max_dets[-1]}": _none_if_nan(result.ar()),
        "per_class": {},
    }
    per = {"AP": result.ap_per_class(), **{f"AP@{t:g}": result.ap_per_class(iou=t) for t in p.iou_thresholds}}
    for k, name in enumerate(class_names):
        out["per_class"][name] = {key: _none_if_nan(float(v[k])) for key, v in per.items()}
    out["undefined_classes"] = [n for k, n in enumerate(class_names) if math.isnan(per["AP"][k])]
    return out


# ============================================================================ VOC / CEIRD protocols

def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point interpolated AP (VOC 2010+, keras-retinanet ``_compute_ap``): the area under the
    precision envelope ``max_{r' >= r} p(r')``, summed where recall changes."""
    mrec = np.concatenate(([0.0], np.asarray(recall, dtype=float), [1.0]))
    mpre = np.concatenate(([0.0], np.asarray(precision, dtype=float), [0.0]))
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


@dataclass(frozen=True)
class VocProtocol:
    """How :func:`voc_evaluate` scores detections.

    ``score_floor``: keep detections scoring strictly above it (CEIRD / CoE-DG ``csv_eval``: 0.05);
    ``max_dets``: per image, best first (None: all); ``absent_class_ap``: the AP of a class without
    ground truth in the evaluated images (None: undefined, left out of the mean — VOC; 0.0 — CEIRD).
    """

    name: str = "voc"
    score_floor: float | None = None
    max_dets: int | None = None
    absent_class_ap: float | None = None


VOC_PROTOCOL = VocProtocol()
CEIRD_PROTOCOL = VocProtocol(name="ceird", score_floor=0.05, max_dets=100, absent_class_ap=0.0)


def _xyxy(box: Sequence[float]) -> np.ndarray:
    x, y, w, h = (float(v) for v in box)
    return np.array([x, y, x + w, y + h])


def voc_evaluate(gt: GroundTruth, rows: Sequence[dict[str, Any]], iou: float,
                 protocol: VocProtocol = VOC_PROTOCOL) -> np.ndarray:
    """Per-class AP ``(K,)`` at one IoU under ``protocol`` (NaN: undefined).

    Detections of a class, all images merged, in score order: each takes the ground-truth box of
    its image with the highest IoU; a true positive when that IoU is ≥ ``iou`` and the box is not yet
    taken, else a false positive (VOC's rule; crowd / "difficult" boxes count neither way).
    """
    cats = gt.category_ids
    index = {c: k for k, c in enumerate(cats)}
    images = set(gt.image_ids)
    truth: dict[tuple[int, int], list[tuple[np.ndarray, bool]]] = {}
    for ann in gt.coco["annotations"]:
        truth.setdefault((int(ann["image_id"]), index[int(ann["category_id"])]), []).append(
            (_xyxy(ann["bbox"]), bool(ann.get("iscrowd", 0))))
    kept = [r for r in rows if int(r["image_id"]) in images and int(r["category_id"]) in index
            and (protocol.score_floor is None or float(r["score"]) > protocol.score_floor)]
    if protocol.max_dets is not None:
        per_image: dict[int, list[dict[str, Any]]] = {}
        for r in kept:
            per_image.setdefault(int(r["image_id"]), []).append(r)
        kept = [r for rs in per_image.values()
                for r in sorted(rs, key=lambda r: -float(r["score"]))[: protocol.max_dets]]
    out = np.full(len(cats), np.nan)
    for k in range(len(cats)):
        n_pos = sum(1 for (img, c), boxes in truth.items() if c == k for _, crowd in boxes if not crowd)
        if n_pos == 0:
            out[k] = np.nan if protocol.absent_class_ap is None else protocol.absent_class_ap
            continue
        dets = sorted((r for r in kept if index[int(r["category_id"])] == k), key=lambda r: -float(r["score"]))
        taken: dict[int, np.ndarray] = {}
        tp, fp = [], []
        for r in dets:
            img = int(r["image_id"])
            boxes = truth.get((img, k), [])
            if not boxes:
                tp.append(0), fp.append(1)
                continue
            gts = np.stack([b for b, _ in boxes])
            d = _xyxy(r["bbox"])
            w = np.clip(np.minimum(d[2], gts[:, 2]) - np.maximum(d[0], gts[:, 0]), 0, None)
            h = np.clip(np.minimum(d[3], gts[:, 3]) - np.maximum(d[1], gts[:, 1]), 0, None)
            inter = w * h
            union = (d[2] - d[0]) * (d[3] - d[1]) + (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1]) - inter
            overlaps = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
            best = int(overlaps.argmax())
            used = taken.setdefault(img, np.zeros(len(boxes), dtype=bool))
            if overlaps[best] >= iou and boxes[best][1]:
                continue  # matched a crowd / difficult box: neither TP nor FP
            if overlaps[best] >= iou and not used[best]:
                used[best] = True
                tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        tps, fps = np.cumsum(tp, dtype=float), np.cumsum(fp, dtype=float)
        recall = tps / n_pos
        precision = tps / np.maximum(tps + fps, np.finfo(float).eps)
        out[k] = voc_ap(recall, precision) if len(dets) else 0.0
    return out


def voc_detection_summary(gt: GroundTruth, rows: Sequence[dict[str, Any]], ious: Sequence[float],
                          protocol: VocProtocol = VOC_PROTOCOL) -> dict[str, Any]:
    """:func:`detection_summary`'s layout (``mAP``, ``mAP@t``, ``per_class``) from :func:`voc_evaluate`."""
    per_iou = {float(t): voc_evaluate(gt, rows, float(t), protocol) for t in ious}

    def mean(values: np.ndarray) -> float | None:
        return None if np.isnan(values).all() else float(np.nanmean(values))

    stacked = np.stack(list(per_iou.values()))  # (T, K)
    per_class_mean = np.array([math.nan if np.isnan(col).all() else float(np.nanmean(col)) for col in stacked.T])
    return {
        "protocol": protocol.name,
        "iou_thresholds": [float(t) for t in ious],
        "mAP": mean(per_class_mean),
        **{f"mAP@{t:g}": mean(v) for t, v in per_iou.items()},
        "per_class": {name: {"AP": _none_if_nan(float(per_class_mean[k])),
                             **{f"AP@{t:g}": _none_if_nan(float(v[k])) for t, v in per_iou.items()}}
                      for k, name in enumerate(gt.class_names)},
        "settings": {"score_floor": protocol.score_floor, "max_dets": protocol.max_dets,
                     "absent_class_ap": protocol.absent_class_ap, "interpolation": "all-point"},
    }


__all__ += ["CEIRD_PROTOCOL", "VOC_PROTOCOL", "VocProtocol", "voc_ap", "voc_detection_summary", "voc_evaluate"]
