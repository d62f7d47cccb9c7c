"""Prometheus metrics of every streamwise process, scraped from the driver.

How the parts fit: ``_stats`` keeps counts in plain numbers on each process's event
loop; ``recorders`` says what replicas, routers, the ingress and the controller
record, into one registry per process; ``endpoint`` serves the driver's scrape
endpoint, which asks every replica for its metrics at each scrape and merges them
with the driver's own. The README lists every metric.
"""
