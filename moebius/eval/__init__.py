"""Benchmarks: protocol mask sets, predictions of any method, scores, side-by-side reports.

masks.py (mask sets), predict.py (a method fills a folder), metrics.py + networks.py (PSNR,
SSIM, LPIPS, FID), score.py (prediction folder vs ground-truth folder), report.py, cli.py.
"""
