//! The spans buffer: assembles tracing spans into segments in Redis and flushes finished
//! segments. Being built; see issue 6.
