"""Predictions back into PACS: a DICOM SR (TID 1500) of boxes, a fractional DICOM SEG of heat maps.

Needs the optional extra ``dicom`` (highdicom). Every object is derived from one source DICOM:
highdicom copies its patient, study and general equipment attributes (nothing is invented) and
references its SOP instance.

* :func:`boxes_to_sr` — a Comprehensive SR whose Measurement Report (TID 1500) holds one
  planar-ROI group (TID 1410) per box: the box as a closed image-region POLYLINE
  (column, row pixel coordinates of the source image, 5 points), its class as the finding type
  (code scheme ``99CXRDISTILL``, meaning = class name) and its score as a measurement
  ("Detection score", unit "1"), with the algorithm identified (cxrdistill + version).
* :func:`maps_to_seg` — a FRACTIONAL (probability) SEG with one segment per class, the maps
  resized to the source image's rows x columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdistill.errors import CxrDistillError

CODE_SCHEME = "99CXRDISTILL"
SCORE_CODE = ("CXRD-SCORE", CODE_SCHEME, "Detection score")
PROCEDURE_CODE = ("399208008", "SCT", "Plain chest X-ray")

__all__ = ["boxes_to_sr", "maps_to_seg", "class_code", "read_source", "prepared_source", "CODE_SCHEME"]


def _hd():
    try:
        import highdicom
    except ImportError:
        raise CxrDistillError("DICOM output needs the optional extra: pip install 'cxrdistill[dicom]'") from None
    return highdicom


def _version() -> str:
    from cxrdistill import __version__

    return __version__


def class_code(index: int, name: str):
    """The coded concept of class `index` (private scheme, meaning = the class name)."""
    hd = _hd()
    return hd.sr.CodedConcept(value=f"CXRD{index:03d}", scheme_designator=CODE_SCHEME, meaning=name[:64])


def read_source(path: Path):
    """The source DICOM dataset (with pixels: SEG needs them; SR only its attributes)."""
    import pydicom

    try:
        return pydicom.dcmread(str(path))
    except Exception as err:  # pydicom raises many kinds on a broken file
        raise CxrDistillError(f"{path}: cannot be read as DICOM ({type(err).__name__})") from None


_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


def prepared_source(ds: Any, path: Path | str = "source") -> Any:
    """A copy of `ds` fit as evidence: the UIDs must be there (else an error naming the file); absent
    type-2 patient/study attributes become empty (DICOM's "unknown"), never made up."""
    missing = [k for k in _REQUIRED if not getattr(ds, k, None)]
    if missing:
        raise CxrDistillError(f"{path}: DICOM lacks {', '.join(missing)}; an SR/SEG must reference them")
    ds = ds.copy()
    for key in _TYPE2:
        if key not in ds:
            setattr(ds, key, "")
    return ds


def _algorithm():
    hd = _hd()
    return hd.sr.AlgorithmIdentification(name="cxrdistill", version=_version())


def boxes_to_sr(source: Any, rows: Sequence[dict[str, Any]], class_names: Sequence[str],
                category_ids: Sequence[int], series_number: int = 990):
    """A Comprehensive SR of COCO result `rows` (``bbox`` xywh in the source's pixels) of one image."""
    hd = _hd()
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    source = prepared_source(source)
    index_of = {int(c): k for k, c in enumerate(category_ids)}
    src_ref = hd.sr.SourceImageForRegion(referenced_sop_class_uid=source.SOPClassUID,
                                         referenced_sop_instance_uid=source.SOPInstanceUID)
    score_name = hd.sr.CodedConcept(*SCORE_CODE)
    unit = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
    groups = []
    for n, row in enumerate(sorted(rows, key=lambda r: -r["score"]), start=1):
        k = index_of[int(row["category_id"])]
        x, y, w, h = (float(v) for v in row["bbox"])
        polyline = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]], dtype=np.float32)
        region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=polyline,
                                   source_image=src_ref)
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"box {n}"),
            referenced_region=region, finding_type=class_code(k, class_names[k]), algorithm_id=_algorithm(),
            measurements=[hd.sr.Measurement(name=score_name, value=float(row["score"]), unit=unit,
                                            algorithm_id=_algorithm())]))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="cxrdistill", model_name=f"cxrdistill {_version()}"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept(*PROCEDURE_CODE), imaging_measurements=groups or None,
        referenced_images=[source] if not groups else None)
    return hd.sr.Comprehensive3DSR(
        evidence=[source], content=report[0], series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="cxrdistill", is_complete=True)


def maps_to_seg(source: Any, probs: np.ndarray, class_names: Sequence[str], series_number: int = 991):
    """A fractional SEG of probability maps ``probs (C, h, w)`` in [0, 1], resized to the source image."""
    hd = _hd()
    from PIL import Image
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    source = prepared_source(source)
    rows, cols = int(source.Rows), int(source.Columns)
    resized = np.stack([np.asarray(Image.fromarray(np.asarray(p, np.float32), mode="F").resize((cols, rows),
                                                                                          Image.BILINEAR))
                        for p in probs], axis=-1)  # (rows, cols, C)
    algorithm = hd.AlgorithmIdentificationSequence(name="cxrdistill", family=codes.cid7162.ArtificialIntelligence,
                                                   version=_version())
    segments = [hd.seg.SegmentDescription(
        segment_number=k + 1, segment_label=name[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=class_code(k, name), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for k, name in enumerate(class_names)]
    return hd.seg.Segmentation(
        source_images=[source], pixel_array=np.clip(resized, 0, 1)[None].astype(np.float32),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL, segment_descriptions=segments,
        series_instance_uid=generate_uid(), series_number=series_number, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="cxrdistill", manufacturer_model_name="cxrdistill heat map",
        software_versions=_version(), device_serial_number="none", omit_empty_frames=False)
