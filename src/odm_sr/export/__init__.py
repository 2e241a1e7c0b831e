"""Deployable integer inference: export a trained static-quantized model to an ONNX integer graph and a packed
b-bit weight file, and run it with ONNX Runtime (``odm-sr-export``, ``odm-sr-upscale --engine onnx``)."""
