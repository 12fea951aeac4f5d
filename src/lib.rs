//! flexnbd: a fast NBD server with live migration.
//!
//! Layers, top to bottom (a layer never reaches up):
//! - [`cli`]: one module per subcommand, argument parsing and `run()` (its
//!   clap definitions are also the man pages and completions, made by
//!   `cargo xtask assets`):
//!   `serve`, `listen`, `mirror` (`--wait`), `mirror-speed`, `break`, `acl`,
//!   `status`, `read`, `write`, `pause`, `resume`, `snapshot`
//!   (`cli::pause`) and `proxy` (`cli::proxy`; the `flexnbd-proxy` program
//!   and `flexnbd` run under that name start in `cli::program`).
//! - [`daemon`]: wiring of export, listeners, control socket, mirror,
//!   signals, shutdown (`daemon::Config`); `daemon::state` holds the one
//!   phase and answers the control commands; pauses are leases
//!   (`daemon::pause`), also taken on the nbdkit-style pause-control socket
//!   (`daemon::pause_control`); `serve --run CMD` and `--unix -` are
//!   `daemon::captive` (the command's process group: [`child`]).
//! - [`proxy`]: `flexnbd proxy`, a server whose backend is an upstream NBD
//!   server (`proxy::upstream`). Hops: client → `server` (handshake in the
//!   upstream's style) → `proxy::session` (checks, `--cache`, multi-conn
//!   flush replay) → `proxy::link` (one upstream connection per client,
//!   requests kept until answered) → upstream; answers back on the link's
//!   thread. On failure the link reconnects (`proxy::retry`), checks the
//!   size and sends the unanswered requests again in order.
//! - [`incoming`]: the destination of a migration (`listen`): the
//!   `FILE.INCOMPLETE` marker, the one sender slot (a silent sender is
//!   replaced), and the rule for when the image has arrived.
//! - [`server`]: listeners, ACL at accept (and `--max-clients`), handshake
//!   (one deadline, `--handshake-timeout`; the one export name,
//!   `--export-name`, and its description; structured replies and extended
//!   headers), one session per connection
//!   (`server::session`; requests run in `server::exec`, replies leave
//!   through `server::out` with a send deadline); what a session serves
//!   from is a `server::Backend` (the image, or the proxy's upstream);
//!   `server::intake` is the hook [`incoming`] plugs into.
//! - [`control`]: control socket grammar (`status`, `acl`, `mirror`,
//!   `mirror_max_bps`, `break`, `mirror_wait`, `pause`, `resume`) and loop
//!   (held pauses keep their connection), and the CLI side.
//! - [`mirror`]: a migration, source side. Steps, in `mirror::copy`: connect
//!   (cancellable) → sweep → passes over the dirty map → active mirroring
//!   (`mirror::observer` forwards client writes) → hand-over (gate closed,
//!   rest sent, flush, ENTRUST to old-style destinations, DISC; it waits
//!   while the image is paused); any failure retries from scratch with
//!   back-off.
//! - [`metrics`]: request counters (atomics, recorded by `server::exec`)
//!   and the `--metrics` endpoint (`metrics::http`).
//! - [`client`]: NBD client used by `read`, `write`, the mirror and the
//!   proxy (pipelined sender and receiver; READ data and block status).
//! - [`export`]: the served image: storage, request gate ([`gate`]: counted
//!   holds), change observer.
//! - [`storage`]: positional file I/O, holes and extents (`storage::map`),
//!   block devices (`storage::device`), the image lock (`storage::lock`),
//!   early writeback of sequential writes (`storage::writeback`).
//! - [`proto`]: the NBD wire format, no I/O; compact and extended headers
//!   (`proto::reply::Framing`), every reply built by `proto::reply::Replies`.
//! - [`tls`]: TLS settings and handshakes (rustls): `--tls` modes,
//!   certificate directories, STARTTLS's handshake on a plain stream. The
//!   server calls it from `server::handshake`, the client from
//!   `client::negotiate`.
//! - [`stream`]: the one transport type (TCP, unix, or TLS over either,
//!   `stream::tls`), used by the server, the client and the proxy.
//! - [`net`], [`addr`], [`acl`], [`sys`], [`log`], [`wait`]: socket options,
//!   addresses, access control, syscall wrappers, log lines, the one
//!   deadline loop.
//! - `fuzzing`: entry points of the cargo-fuzz targets in `fuzz/` (not an API).

pub mod proto;

#[macro_use]
pub mod log;

pub mod acl;
pub mod addr;
pub mod child;
pub mod cli;
pub mod client;
pub mod control;
pub mod daemon;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod gate;
pub mod incoming;
pub mod metrics;
pub mod mirror;
pub mod net;
pub mod proxy;
pub mod server;
pub mod storage;
pub mod stream;
pub mod sys;
pub mod tls;
pub mod wait;
