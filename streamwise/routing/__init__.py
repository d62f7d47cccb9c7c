"""Handles, responses, the router and the transport to replicas."""
