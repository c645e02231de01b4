//! Transports: the FUSE wire protocol engine and the files it serves.

pub mod cuse;
pub mod engine;
pub mod fusefs;
pub mod mount;
pub mod sys;
pub mod turn;
pub mod uring;
pub mod wire;
