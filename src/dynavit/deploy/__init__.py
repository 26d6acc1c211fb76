"""Taking execution paths to production: physically sliced paths (``slice``), files (``export``, ``folder``),
ONNX Runtime (``onnxrt``), compiled paths (``compiled``) and prediction over a folder (``predict``).

Submodules are imported where they are used: ``model.py`` uses ``export`` and ``compiled``, and
``onnxrt`` builds on ``model.py``, so this package imports none of them itself.
"""
