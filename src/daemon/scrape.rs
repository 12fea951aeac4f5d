//! What `/metrics` shows besides the request counters: the gauges read
//! from the server's `status` at each scrape.

use crate::control::Status;
use crate::metrics::{family, gauge, sample};

/// The gauges read from a server's `status` at each scrape: clients, the
/// image, a running migration and a pause.
pub fn encode_status(out: &mut String, st: &Status) {
    gauge(
        out,
        "flexnbd_clients",
        "Clients connected.",
        st.num_clients as f64,
    );
    gauge(
        out,
        "flexnbd_image_size_bytes",
        "Size of the image served.",
        st.size as f64,
    );
    gauge(
        out,
        "flexnbd_has_control",
        "1 when this server owns the image (0: a listener still waiting for a migration).",
        f64::from(u8::from(st.has_control)),
    );
    family(
        out,
        "flexnbd_migration_state",
        "gauge",
        "1 for the state of the outgoing migration (none: no migration running).",
    );
    let now = st.migration.as_ref().map_or("none", |m| m.state.as_str());
    for s in ["none", "copying", "retrying", "active", "handover"] {
        sample(
            out,
            "flexnbd_migration_state",
            &[("state", s)],
            f64::from(u8::from(s == now)),
        );
    }
    let m = st.migration.as_ref();
    gauge(
        out,
        "flexnbd_migration_bytes_left",
        "Bytes the running migration has still to send (0 without one).",
        m.map_or(0, |m| m.bytes_left) as f64,
    );
    gauge(
        out,
        "flexnbd_migration_speed_bytes_per_second",
        "Recent speed of the running migration (0 without one).",
        m.map_or(0, |m| m.speed) as f64,
    );
    gauge(
        out,
        "flexnbd_migration_attempts",
        "Attempts of the running migration so far (0 without one).",
        m.map_or(0, |m| m.attempts) as f64,
    );
    let p = st.pause.as_ref();
    gauge(
        out,
        "flexnbd_paused",
        "1 while requests are paused.",
        f64::from(u8::from(p.is_some())),
    );
    gauge(
        out,
        "flexnbd_pause_queued_requests",
        "Requests waiting for the pause to end.",
        p.map_or(0, |p| p.queued_requests) as f64,
    );
}
