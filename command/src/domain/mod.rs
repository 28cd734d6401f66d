//! The aggregates: pure, synchronous decision logic with no I/O. Anything from outside
//! (ids, clocks, hashes) is put into the command before `handle` sees it.

pub mod user;
