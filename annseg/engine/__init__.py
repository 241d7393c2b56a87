"""Training, evaluation and inference on Lightning: config -> module -> checkpoints -> metrics."""

from annseg.engine.checkpoint import load_model, read_checkpoint
from annseg.engine.config import Config, ConfigError, dump_config, load_config
from annseg.engine.inference import infer
from annseg.engine.metrics import SegmentationMetrics, format_table
from annseg.engine.segmenter import Segmenter, load
from annseg.engine.train import Hardware, fit

__all__ = ["Config", "ConfigError", "Hardware", "SegmentationMetrics", "Segmenter", "dump_config", "fit",
           "format_table", "infer", "load", "load_config", "load_model", "read_checkpoint"]
