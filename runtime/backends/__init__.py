"""Inference engines behind one protocol: :class:`session.Session` and :func:`session.open_session`
(ONNX Runtime, TensorRT). A new backend is a module here."""
