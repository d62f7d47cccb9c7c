"""Autoscaling: load reports pushed to the controller, and the rule that turns them
into a replica count (``policy``), applied by the controller (``actors.controller``)."""
