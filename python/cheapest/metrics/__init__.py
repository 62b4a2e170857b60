"""Prometheus metrics for operators: what the service does, never what it was asked.

`series.py` defines every series and the hooks the service calls (`metrics.request(...)`, `metrics.scheduler(model)`,
...); `files.py` keeps each worker's values in the host's metrics directory so that one scrape sees every worker;
`exposition.py` decides who may scrape and encodes the answer. The `/metrics` route is server/metrics.py.
"""

from cheapest.metrics.series import Metrics, SchedulerSeries

metrics = Metrics()  # this process's series; every hook is a no-op until a worker starts them

__all__ = ["Metrics", "SchedulerSeries", "metrics"]
