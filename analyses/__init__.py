"""The paper's analyses as DVC experiments: ``python -m analyses.run <analysis>`` queues and runs them,
``python -m analyses.report`` turns the recorded runs into one Markdown report (docs/analyses.md)."""
