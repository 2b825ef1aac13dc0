"""lm-eval loads this file by path (``custom_dataset: !function data.load``); the reader lives in the package."""

from modelfactory.benchmark.task_data import piqa_validation


def load(**_task_metadata):
    return piqa_validation()
