"""cxrdistill: chest X-ray detectors and classifiers distilled from every kind of supervision."""

__version__ = "0.1.0"
