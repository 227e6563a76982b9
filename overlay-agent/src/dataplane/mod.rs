//! The dataplane: programs and state that move container packets between hosts.

pub mod ebpf;
