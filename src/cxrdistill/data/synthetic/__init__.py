"""The built-in synthetic chest X-ray world: phantom radiographs with exact boxes and reports.

- `anatomy`: the procedural thorax (lungs, ribs, heart, diaphragm, ...) and its pose.
- `lesions`: the lesion classes, how they are sampled and rendered.
- `render`: `render_image`, composing anatomy, lesions, exposure and noise.
- `reports`: reports written from the truth, with a controlled error rate.
- `world`: `make_world`, a whole dataset (PNGs + extended-COCO manifest) on disk.
"""

from cxrdistill.data.synthetic.lesions import SYNTHETIC_CLASSES, Lesion, sample_lesion
from cxrdistill.data.synthetic.render import render_image
from cxrdistill.data.synthetic.reports import write_report
from cxrdistill.data.synthetic.world import make_world

__all__ = ["SYNTHETIC_CLASSES", "Lesion", "make_world", "render_image", "sample_lesion", "write_report"]
