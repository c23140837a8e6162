"""Dataset tools: synthetic demo sets, COCO/YOLO conversion, validation and statistics."""
