"""Benchmarks: what Corral costs on top of llama.cpp and bare Celery, measured side by side.

Run ``python -m benchmarks.run`` (``--quick`` for a short pass, ``--json out.json`` for the
raw figures); see the README's "Benchmarks" section for what each figure means.
"""
