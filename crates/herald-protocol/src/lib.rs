//! # herald-protocol (placeholder until the HTTP types land)
