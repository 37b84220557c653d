//! # herald-server (placeholder)
