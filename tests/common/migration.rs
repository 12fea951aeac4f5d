//! Migration test helpers shared by the `migrate_*` tests: a real source
//! (`flexnbd serve` on a random image) and a real destination (`flexnbd
//! listen` on a sparse image) with checks of its waiting state.

use super::*;
use std::path::PathBuf;
use std::time::Duration;

/// Per-request timeout of the sources made by [`source`] (hangs are detected in a second).
pub const SOURCE_REQUEST_LIMIT: &str = "1";

/// A real source serving a random image of `size` bytes.
pub struct Source {
    pub _dir: tempfile::TempDir,
    pub file: PathBuf,
    pub srv: Server,
}

/// `flexnbd serve` on a random image of `size` bytes (from `seed`), with
/// [`SOURCE_REQUEST_LIMIT`].
pub fn source(size: u64, seed: u64) -> Source {
    source_with(size, seed, &[])
}

/// [`source`] with `extra` arguments for the server.
pub fn source_with(size: u64, seed: u64, extra: &[&str]) -> Source {
    let dir = tempdir();
    let file = dir.path().join("src.img");
    create_random_file(&file, size, seed);
    let srv = Daemon::serve(&file, &dir.path().join("src.sock"))
        .args(extra)
        .env("FLEXNBD_MS_REQUEST_LIMIT_SECS", SOURCE_REQUEST_LIMIT)
        .start();
    Source {
        _dir: dir,
        file,
        srv,
    }
}

/// A real `listen` on a sparse image of `size`.
pub struct Listener {
    pub dir: tempfile::TempDir,
    pub file: PathBuf,
    pub srv: Server,
}

pub fn listener(size: u64, extra: &[&str]) -> Listener {
    listener_env(size, extra, &[])
}

/// [`listener`] with environment variables set for the server.
pub fn listener_env(size: u64, extra: &[&str], env: &[(&str, &str)]) -> Listener {
    let dir = tempdir();
    let file = dir.path().join("dst.img");
    create_sparse_file(&file, size);
    let mut d = Daemon::listen(&file, &dir.path().join("dst.sock")).args(extra);
    for (k, v) in env {
        d = d.env(k, v);
    }
    let srv = d.start();
    Listener { dir, file, srv }
}

impl Listener {
    /// Control arrives (has_control=true within 10 s) and the marker is gone.
    #[track_caller]
    pub fn assert_took_control(&self) {
        assert!(
            wait_until(Duration::from_secs(10), || {
                try_status(self.srv.ctl()).is_some_and(|s| s["has_control"] == "true")
            }),
            "control never arrived: {:?}; log:\n{}",
            try_status(self.srv.ctl()),
            self.srv.stderr()
        );
        assert!(
            !marker_of(&self.file).exists(),
            "marker kept after control arrived"
        );
    }

    /// Still waiting for a migration: alive, no control, marker present.
    #[track_caller]
    pub fn assert_waiting(&mut self) {
        self.srv.assert_alive();
        let st = status_map(self.srv.ctl());
        assert_eq!(st["has_control"], "false", "{st:?}");
        assert_eq!(st["clients_allowed"], "false", "{st:?}");
        assert!(marker_of(&self.file).exists());
    }

    /// Still waiting, and stays so for `d` (a hand-over is processed
    /// asynchronously after the sender's session ends, so one look is not enough).
    #[track_caller]
    pub fn assert_stays_waiting(&mut self, d: Duration) {
        self.assert_waiting();
        let gave = wait_until(d, || {
            try_status(self.srv.ctl()).is_some_and(|s| s["has_control"] != "false")
                || !marker_of(&self.file).exists()
        });
        assert!(
            !gave,
            "the listener took control: {:?}, marker exists: {}; log:\n{}",
            try_status(self.srv.ctl()),
            marker_of(&self.file).exists(),
            self.srv.stderr()
        );
        self.assert_waiting();
    }

    /// Waits until the listener has no connection (the sender's session ended).
    #[track_caller]
    pub fn wait_no_clients(&self) {
        assert!(
            wait_until(Duration::from_secs(10), || {
                try_status(self.srv.ctl()).is_some_and(|s| s["num_clients"] == "0")
            }),
            "sender's session did not end: {:?}",
            try_status(self.srv.ctl())
        );
    }

    /// A real migration from a fresh `serve` completes into this listener:
    /// `mirror` succeeds, the source exits 0, control arrives, marker gone,
    /// the file equals the source.
    #[track_caller]
    pub fn real_migration_completes(&mut self, seed: u64) {
        let size = std::fs::metadata(&self.file).unwrap().len();
        let mut src = source(size, seed);
        mirror_cmd(src.srv.ctl(), self.srv.addr(), &[]).expect_success("real mirror");
        self.assert_handed_over(&mut src);
        let _ = &self.dir;
    }

    /// `src` handed its image over to this listener: the source exited 0,
    /// control arrived here, and the two files are equal.
    #[track_caller]
    pub fn assert_handed_over(&self, src: &mut Source) {
        assert_eq!(
            src.srv
                .wait_exit(Duration::from_secs(60))
                .and_then(|s| s.code()),
            Some(0),
            "source; log:\n{}",
            src.srv.stderr()
        );
        self.assert_took_control();
        assert_bytes_eq(
            &read_file(&self.file),
            &read_file(&src.file),
            "migrated image",
        );
    }
}
