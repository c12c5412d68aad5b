"""The command line's side of the project: which stack runs (`stack`), launching the pipelines and finding the runs
they start from (`launch`, `sources`), schedules (`schedule`), the end-of-run summary (`summary`) and run
comparison (`compare`, `compare_runs`). `run.py` is its entry point; nothing in `llmtune/`, `steps/` or
`pipelines/` imports it.
"""
