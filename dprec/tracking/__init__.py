"""MLflow tracking and registry of training runs (DESIGN §5).

``store`` (where runs go, legal names) <- ``plots`` / ``registry`` (pyfunc + @champion) <-
``tracker`` (RunTracker) <- ``fit`` (tracked_fit: a Trainer's fit inside a tracked run).
``serving`` is the registered pyfunc; it is logged as code and imports nothing of dprec.
Details in docs/training-and-registry.md.
"""
