"""The stage graph behind ``immunocto run``: every stage joins it as it is built."""

from immunocto.pipeline.run import DEMO_DIR, STAGES, RunSummary, Stage, run_pipeline

__all__ = ["DEMO_DIR", "STAGES", "RunSummary", "Stage", "run_pipeline"]
