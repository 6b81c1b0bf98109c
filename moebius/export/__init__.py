"""Deployment: ONNX export of the three networks (`onnx`) and the onnxruntime backend (`runtime`).

Nothing is imported here, so `import moebius.export` stays light; onnx / onnxruntime are the
`export` extra and are imported only by the modules that need them.
"""
