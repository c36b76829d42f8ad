"""`kat eval`: accuracy, output tokens and think-on rate per mode and category, and reports.

`metrics.py` (pure functions: pass@k, token statistics, token reduction, the oracle router
and the frontier), `runner.py` (prompts,
forced modes, generation and scoring), `report.py` (eval.json/eval.md/samples.jsonl and the demo's
report.md), `plots.py` (PNG charts).
"""
