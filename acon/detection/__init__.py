"""Object detection on our backbones: COCO-format data, the synthetic shapes set, COCO metrics, detectors.

Importing this package does not import pycocotools; ``acon.detection.metrics`` does.
"""
