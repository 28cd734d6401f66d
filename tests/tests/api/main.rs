//! Black-box tests of the running system over HTTP, against the real infrastructure.
//! One binary (one link) for every test that can run in parallel with the others.

mod commands;
mod notify;
mod queries;
mod read_side;
mod registry;
mod users;
