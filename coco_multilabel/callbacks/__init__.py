from coco_multilabel.callbacks.random_state import RandomStateCheckpoint
from coco_multilabel.callbacks.skipped_images import SkippedImageReport
from coco_multilabel.callbacks.thresholds import ThresholdTuner

__all__ = ["RandomStateCheckpoint", "SkippedImageReport", "ThresholdTuner"]
