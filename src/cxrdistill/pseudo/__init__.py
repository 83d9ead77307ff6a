"""Pseudo-label mechanisms as small pure functions the recipes compose.

- ``thresholds``: score thresholds (STAC) and detections → detector targets
- ``top_kappa``: class-balanced top-κ selection (Martins & Silva)
- ``sa_nms``: self-adaptive NMS of teacher and student boxes (CEIRD)
- ``report_filter``: RPDLR / APCLR cross-modal filters (CEIRD)
- ``sharpening``: adaptive asymmetric label sharpening + KL loss (AALS)
- ``soft_focal``: soft focal distillation loss (OXnet)
- ``store``: versioned, resumable on-disk pseudo-label store
"""
