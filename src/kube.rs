//! The Kubernetes API side of the agent (stub: helper fills in).
