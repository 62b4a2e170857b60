//! sse (to be written)
