"""Plan a target before running it: file sizes, peak RAM and time per stage, against the machine.

Nothing here is a typed-in rate. Each experiment is *probed*: the workflow itself runs it for a few steps
in a scratch directory, and what its stages wrote and used is measured and scaled to the full run.

- ``costs``: the cost model, pure (no I/O): sizes, peak RAM, times, what a job asks a scheduler for;
- ``calibration``: the probes cached in results/calibration/ and shipped in workflow/calibration/;
- ``probe``: runs the workflow on a short copy of an experiment and measures it (``measure``);
- ``target``: the files a target needs (Snakemake's summary) and their plan;
- ``recording``: an outside recording (an experiment whose source is a recording) as the workflow plans it: its
  problems and sizes read without opening an HDF5 file;
- ``report``: the plan as text.

Importing this package loads neither torch nor h5py: the rules' resources use it while Snakemake builds
the DAG.
"""

from thimble.errors import PlanError
from thimble.plan.calibration import (
                                      CALIBRATION_DIR,
                                      CALIBRATION_FORMAT,
                                      Calibration,
                                      any_calibration,
                                      calibration_key,
                                      nearest_calibration,
                                      shipped_calibration_dir,
                                      step_time_calibration,
                                      training_peak_ram,
                                      training_seconds,
)
from thimble.plan.costs import (
                                      STAGES,
                                      RecordedRun,
                                      array_bytes,
                                      job_mem_mb,
                                      job_runtime_min,
                                      peak_ram_bytes,
                                      power_sum,
                                      predict_size,
                                      stage_seconds,
)
from thimble.plan.probe import default_snakefile
from thimble.plan.report import format_plan, human_bytes, human_seconds
from thimble.plan.target import existing_bytes, make_plan

__all__ = ["CALIBRATION_DIR", "CALIBRATION_FORMAT", "STAGES", "Calibration", "PlanError", "RecordedRun",
           "any_calibration", "array_bytes", "calibration_key", "default_snakefile", "existing_bytes", "format_plan",
           "human_bytes", "human_seconds", "job_mem_mb", "job_runtime_min", "make_plan", "nearest_calibration",
           "peak_ram_bytes",
           "power_sum", "predict_size", "shipped_calibration_dir", "stage_seconds", "step_time_calibration",
           "training_peak_ram", "training_seconds"]
