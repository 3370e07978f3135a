"""The benchmark report: one HTML page (plus a Markdown twin) per run and a comparison page.

`render` (CLI `report`) gathers a run's files, `compare` (CLI `compare`) puts runs side by side.
"""
