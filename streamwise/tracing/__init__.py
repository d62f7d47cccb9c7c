"""OpenTelemetry traces across every process: spans (API only), SDK setup, the viewer."""
