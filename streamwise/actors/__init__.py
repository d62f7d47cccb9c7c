"""Deployments, the app graph, replica processes, the controller and launchers."""
