"""Evaluation: datasets on disk, quality metrics (AUROC, AUPRO), batch and stream runs, report files."""
