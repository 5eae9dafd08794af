"""Exports for deployment: ONNX graphs of the image encoder and the fusion head (``fusionseg export``)."""
