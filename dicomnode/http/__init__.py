"""The operators' view of the node: dashboard, REST API, /metrics and /healthz (its own process).

Never imports torch or the models' runners: a broken model must not take the dashboard down.
"""
