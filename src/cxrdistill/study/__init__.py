"""Studies: every recipe on the same data, a matrix of labeled fractions × seeds, one table.

    from cxrdistill.study import make_study, run_study
    spec = make_study({"name": "demo", "output_dir": "runs/demo", "fractions": [0.1, 0.3], "seeds": [0, 1],
                       "recipes": {"supervised": {"config": "configs/supervised_detector.yaml"}}})
    result = run_study(spec)          # result.table, result.table_path, result.report_path
"""

from cxrdistill.study.runner import Cell, StudyResult, job_commands, run_study, study_cells
from cxrdistill.study.spec import RecipeEntry, StudySpec, load_study, make_study

__all__ = ["Cell", "RecipeEntry", "StudyResult", "StudySpec", "job_commands", "load_study", "make_study",
           "run_study", "study_cells"]
