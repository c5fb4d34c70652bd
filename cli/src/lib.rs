//! Pieces of the `hubmsg` command line that its tests use too.
//!
//! - [`chaos`]: the fault-injecting TCP link of `hubmsg demo` and of the chaos soak test.

pub mod chaos;
