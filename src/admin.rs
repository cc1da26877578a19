//! Admin listener (its own thread): /health, /ping, /metrics.
