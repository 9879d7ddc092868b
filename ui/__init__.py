"""``tuneq ui``: a live web dashboard over the job database, its JSON API, and Prometheus
metrics. Imports flow ``cli → ui → worker → schemas``."""
