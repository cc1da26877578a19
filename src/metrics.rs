//! Prometheus text rendering (admin thread) of the merged statistics.
