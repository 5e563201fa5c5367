//! The embedded `add-buffer.lua` and its SHA.
//!
//! The script is compiled into the binary, so the code and the script it calls can never
//! disagree. Pipelined `EVALSHA` gets no automatic `NOSCRIPT` fallback from the redis crate,
//! so the store loads the script on every master up front and again when a call reports
//! `NOSCRIPT` (a restarted or flushed server).

use std::sync::LazyLock;

/// The source of `lua/add-buffer.lua`.
pub const ADD_BUFFER_SOURCE: &str = include_str!("../../../lua/add-buffer.lua");

static ADD_BUFFER: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(ADD_BUFFER_SOURCE));

/// The add-buffer script (source and SHA1).
pub fn add_buffer() -> &'static redis::Script {
    &ADD_BUFFER
}
