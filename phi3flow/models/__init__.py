"""The log steps: the transformers chat model and the ONNX pyfunc, logged with what they need."""
