//! Composable stream-processing steps with backpressure and safe offset commits.
//!
//! The framework is being built; see issue 2.
#![warn(missing_docs)]
