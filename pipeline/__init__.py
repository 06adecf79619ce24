"""The learning, without networking: model specs and layers, data, stages, schedules, the split planner,
the job plan, the helper scheduler. Testable in one process.

    import pipeline
    model = pipeline.build_model({"name": "mlp", "depth": 4}, seed=0)
"""
from pipeline.config import ConfigError, JobConfig
from pipeline.data import DataError, Dataset, load
from pipeline.jobplan import Facts, JobPlan, PassPlan, PlanError
from pipeline.models import SpecError, build_layer, build_model, footprint
from protocols.errors import SplitringError

__all__ = ["ConfigError", "DataError", "Dataset", "Facts", "JobConfig", "JobPlan", "PassPlan", "PlanError",
           "SpecError", "SplitringError", "build_layer", "build_model", "footprint", "load"]
