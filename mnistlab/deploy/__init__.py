"""Using trained models outside training: preprocessing, prediction, ONNX export, serving."""
