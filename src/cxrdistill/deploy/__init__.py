"""Deployment: a trained model outside the training toolkit.

* :mod:`cxrdistill.deploy.postprocess` and :mod:`cxrdistill.deploy.runtime` need only numpy,
  Pillow and onnxruntime (no torch): the RetinaNet anchors + decode + per-class NMS, the heat-map
  regions, and :class:`~cxrdistill.deploy.runtime.OnnxModel`, which runs an exported ``model.onnx``.
* :mod:`cxrdistill.deploy.onnx_export` and :mod:`cxrdistill.deploy.folder` (torch) write what
  ``cxrdistill export --format onnx|folder`` produces; :func:`cxrdistill.deploy.folder.load_model`
  reads a ``model.pt`` or a model folder back for ``cxrdistill predict``.
"""
