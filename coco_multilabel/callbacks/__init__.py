from coco_multilabel.callbacks.thresholds import ThresholdTuner

__all__ = ["ThresholdTuner"]
