"""Interoperability with hospital systems (DICOM structured reports and segmentations)."""
