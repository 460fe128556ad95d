"""Detectors, one file each (deeplog.py, attgru.py), behind the interface in base.py.
Training, evaluation and the detect stage all call the same Detector.score, so a verdict in the
stream equals the verdict in evaluation."""
