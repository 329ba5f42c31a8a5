from coco_multilabel.models.classifier import MultiLabelClassifier

__all__ = ["MultiLabelClassifier"]
