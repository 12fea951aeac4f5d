//! flexnbd: a fast NBD server with live migration.
//!
//! Layers, top to bottom (a layer never reaches up):
//! - [`cli`]: one module per subcommand, argument parsing and `run()`.
//! - [`daemon`]: wiring of export, listeners, control socket, mirror, signals.
//! - [`server`]: listeners, ACL at accept, one session per connection.
//! - [`control`]: control socket grammar and loop.
//! - [`client`]: NBD client used by `read`, `write` and the mirror.
//! - [`export`]: the served image: storage, dirty tracking, request gate.
//! - [`storage`]: positional file I/O, holes and extents.
//! - [`proto`]: the NBD wire format, no I/O.

pub mod proto;

#[macro_use]
pub mod log;

pub mod acl;
pub mod addr;
pub mod cli;
pub mod client;
pub mod control;
pub mod daemon;
pub mod export;
pub mod incoming;
pub mod mirror;
pub mod net;
pub mod server;
pub mod storage;
pub mod sys;
