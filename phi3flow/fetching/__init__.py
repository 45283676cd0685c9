"""fetch_model: pinned hub downloads, the manifest of hashes, the ONNX builder."""
