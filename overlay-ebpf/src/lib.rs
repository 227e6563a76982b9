//! Empty on purpose: the programs live in the `overlay` binary target (`src/main.rs`). The library
//! target exists so that `overlay-agent` can name this crate as a build dependency, which makes
//! cargo rebuild the agent (and so re-embed the object) when the programs change.
#![no_std]
