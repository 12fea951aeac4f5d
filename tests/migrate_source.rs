//! The source of a migration (`serve` + `mirror`) where it used to go wrong:
//! a hung destination must not stall guest writes, status and progress must
//! stay exact in failure states, a server must not migrate onto itself,
//! `mirror --wait` must learn the outcome from the server, and the moments
//! around "started" (connecting, checking the greeting) belong to the
//! migration: `break` stops it, a signal makes the source exit 1.

mod common;
mod fakepeer;

use common::*;
use fakepeer::{DestConfig, FakeDest, Fault};
use std::process::Command;
use std::time::{Duration, Instant};

/// Waits (up to `timeout`) for a status of `ctl` that satisfies `cond`; returns it.
#[track_caller]
fn wait_status(
    ctl: &std::path::Path,
    timeout: Duration,
    cond: impl Fn(&std::collections::BTreeMap<String, String>) -> bool,
) -> std::collections::BTreeMap<String, String> {
    let mut last = None;
    let ok = wait_until(timeout, || {
        last = try_status(ctl);
        last.as_ref().is_some_and(&cond)
    });
    assert!(ok, "status never matched: last {last:?}");
    last.unwrap()
}

// ---------------------------------------------------------------- a stalled destination

/// Expected: with the destination SIGSTOPped for 3 s during active
/// mirroring, guest writes keep being acknowledged: none issued while it is
/// stopped takes longer than 1 s (a forwarded write gives up waiting once
/// the destination has confirmed nothing for 250 ms; it is acknowledged and
/// its blocks go back to the dirty map), and the attempt does not fail (the
/// request limit is the default 60 s). After SIGCONT the migration
/// completes, the destination holds every acknowledged write and equals the
/// source's final file.
#[test]
fn guest_writes_do_not_stall_on_a_sigstopped_destination() {
    let size = 8 * MIB;
    let dir = tempdir();
    let file = dir.path().join("src.img");
    create_random_file(&file, size, 70);
    let mut srv = Daemon::serve(&file, &dir.path().join("src.sock")).start();
    let l = listener(size, &[]);
    let mut writer = LoadWriter::start(&srv.uri(), 8, 70);
    // Slower than the load dirties the image: the passes do not converge
    // and the source mirrors writes actively.
    mirror_cmd(srv.ctl(), l.srv.addr(), &["--max-speed", "2000000"]).expect_success("mirror");
    let poller = StatusPoller::start(srv.ctl());
    let ctl = srv.ctl().to_owned();
    let ctl_s = ctl.display().to_string();
    wait_status(&ctl, Duration::from_secs(60), |s| {
        s.get("migration_state").map(String::as_str) == Some("active")
    });
    // Keep it in active mirroring (over 4 MiB dirty) while the destination is stopped.
    flexnbd(&["mirror-speed", "--sock", &ctl_s, "--max-speed", "200000"])
        .expect_success("mirror-speed");
    l.srv.signal(SIGSTOP);
    let stopped = now_epoch();
    std::thread::sleep(Duration::from_secs(3)); // the fault itself
    let during = status_map(&ctl);
    let resumed = now_epoch();
    l.srv.signal(SIGCONT);
    flexnbd(&["mirror-speed", "--sock", &ctl_s, "--max-speed", "0"])
        .expect_success("mirror-speed 0");
    let exit = srv.wait_exit(Duration::from_secs(60));
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(0),
        "source: {}",
        srv.stderr()
    );
    let polled = poller.finish();
    let r = writer.finish(Duration::from_secs(30));
    let worst = load_worst_latency(&r, stopped, resumed);
    let acked = load_acked_after(&r, stopped) - load_acked_after(&r, resumed);
    eprintln!(
        "worst guest write latency with the destination stopped for 3 s: {worst:.3} s; \
         {acked} writes acknowledged meanwhile; status then: {during:?}"
    );
    assert_eq!(during["migration_state"], "active", "{during:?}");
    assert_eq!(during["migration_attempts"], "1", "{during:?}");
    assert!(
        worst < 1.0,
        "a guest write took {worst:.3} s while the destination was stopped"
    );
    assert!(
        acked > 200,
        "writes were not acknowledged while the destination was stopped"
    );
    assert!(wait_until(Duration::from_secs(10), || try_status(
        l.srv.ctl()
    )
    .is_some_and(|s| s["has_control"] == "true")));
    assert_bytes_eq(
        &read_file(&l.file),
        &read_file(&file),
        "destination vs source",
    );
    let checked = check_acknowledged_writes(&r, |b| read_file_at(&l.file, b * 4096, 4096));
    assert!(checked > 100, "{checked} blocks checked");
    check_load_failures(&r, polled.last_allowed);
}

// ---------------------------------------------------------------- status in failure states

/// Expected: while a migration retries (the destination closes the first
/// connection at its second write, then refuses three more at accept):
/// `migration_state=retrying`, `migration_bytes_left` exactly the size,
/// speed 0 and no `migration_seconds_left`, a `migration_retry_in` and a
/// `migration_last_error`; `migration_attempts` counts every attempt,
/// including those refused at accept (it ends equal to the number of
/// connections). `mirror --wait` prints "retrying in Ns (attempt k): reason"
/// lines on stderr, then succeeds once the fifth connection completes.
#[test]
fn status_while_retrying_is_exact_and_says_why() {
    let size = 8 * MIB;
    let mut src = source(size, 71);
    let fake = FakeDest::start(DestConfig::newstyle(size).faults(&[
        Fault::CloseAtWrite(2),
        Fault::CloseAtAccept,
        Fault::CloseAtAccept,
        Fault::CloseAtAccept,
    ]));
    let ctl = src.srv.ctl().display().to_string();
    let port = fake.port().to_string();
    // 4 MB pieces: two writes per copy, the first confirmed before the cut.
    let mut waiter = Background::spawn(Command::new(bin()).args([
        "mirror",
        "--addr",
        "127.0.0.1",
        "--port",
        &port,
        "--sock",
        &ctl,
        "--wait",
        "--max-speed",
        "16000000",
    ]));
    let st = wait_status(src.srv.ctl(), Duration::from_secs(20), |s| {
        s.get("migration_state").map(String::as_str) == Some("retrying")
    });
    assert_eq!(status_u64(&st, "migration_bytes_left"), size, "{st:?}");
    assert_eq!(status_u64(&st, "migration_speed"), 0, "{st:?}");
    assert!(!st.contains_key("migration_seconds_left"), "{st:?}");
    assert!(st.contains_key("migration_retry_in"), "{st:?}");
    assert!(!st["migration_last_error"].contains(' '), "{st:?}");
    let json = flexnbd(&["status", "--sock", &ctl, "--json"]);
    let j: serde_json::Value = serde_json::from_str(json.stdout_str().trim()).unwrap();
    if j["migration_state"] == "retrying" {
        let e = j["migration_last_error"].as_str().unwrap();
        assert!(!e.is_empty() && !e.contains('%'), "decoded in JSON: {j}");
    }
    // Every sample, to the end: never above the size, attempts never behind
    // the connections the destination saw (give or take the one being made).
    let mut max_attempts = 0;
    while let Some(s) = try_status(src.srv.ctl()) {
        if s["is_mirroring"] != "true" {
            break;
        }
        assert!(status_u64(&s, "migration_bytes_left") <= size, "{s:?}");
        let a = status_u64(&s, "migration_attempts");
        assert!(
            a + 1 >= fake.connections() as u64,
            "{a} attempts, {} connections",
            fake.connections()
        );
        max_attempts = max_attempts.max(a);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        waiter.wait(Duration::from_secs(60)).is_some(),
        "mirror --wait still running"
    );
    assert_eq!(
        waiter.status.unwrap().code(),
        Some(0),
        "{}",
        waiter.stderr()
    );
    assert_eq!(max_attempts, 5, "every attempt counted");
    assert_eq!(fake.connections(), 5);
    let err = waiter.stderr();
    assert!(
        err.lines()
            .any(|l| l.contains("retrying in") && l.contains("(attempt")),
        "progress lines: {err}"
    );
    assert!(fake.wait_completed(Duration::from_secs(5)).is_some());
    let _ = src.srv.wait_exit(Duration::from_secs(20));
}

// ---------------------------------------------------------------- own address

/// Expected: `mirror` to the server's own listening address is refused at
/// once (exit 1, a message saying so), nothing starts, and the image is
/// untouched; with the server on 0.0.0.0, another loopback address on its
/// port is refused too.
#[test]
fn mirror_to_its_own_address_is_refused() {
    let size = 4 * MIB;
    let mut src = source(size, 72);
    let before = md5_file(&src.file);
    for dest in [
        src.srv.addr(),
        format!("0.0.0.0:{}", src.srv.port.unwrap())
            .parse()
            .unwrap(),
    ] {
        let out = mirror_cmd(src.srv.ctl(), dest, &[]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            out.stderr_str().contains("own address"),
            "{}",
            out.stderr_str()
        );
        let st = status_map(src.srv.ctl());
        assert_eq!(st["is_mirroring"], "false", "{st:?}");
    }
    src.srv.assert_alive();
    assert_eq!(md5_file(&src.file), before);

    let dir = tempdir();
    let file = dir.path().join("any.img");
    create_random_file(&file, MIB, 73);
    let any = Daemon::serve(&file, &dir.path().join("any.sock"))
        .ip("0.0.0.0")
        .start();
    let other_loopback = format!("127.0.0.2:{}", any.port.unwrap()).parse().unwrap();
    let out = mirror_cmd(any.ctl(), other_loopback, &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr_str().contains("own address"),
        "{}",
        out.stderr_str()
    );
}

// ---------------------------------------------------------------- mirror --wait

/// Expected: `mirror ... wait` on the control socket gets two lines on one
/// connection: `0: Mirror started`, then the outcome, sent before the
/// source exits at the hand-over.
#[test]
fn mirror_with_wait_gets_the_outcome_on_the_same_connection() {
    use std::io::{Read, Write};
    let mut src = source(64 * KIB, 74);
    let l = listener(64 * KIB, &[]);
    let mut s = std::os::unix::net::UnixStream::connect(src.srv.ctl()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "mirror\n127.0.0.1\n{}\nexit\n0\n0\nforever\nwait\n\n",
        l.srv.port.unwrap()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(
        got,
        "0: Mirror started\n0: migration complete: handed over\n"
    );
    let st = src.srv.wait_exit(Duration::from_secs(20));
    assert_eq!(st.and_then(|s| s.code()), Some(0));
}

/// Expected: `mirror --wait` of a tiny image, whose source hands over and
/// exits within milliseconds, reports success every time (20 runs): exit 0,
/// "Migration started" then "migration complete: handed over".
#[test]
fn mirror_wait_never_guesses_from_a_vanished_socket() {
    for i in 0..20 {
        let mut src = source(4096, 75 + i);
        let l = listener(4096, &[]);
        let out = mirror_cmd(src.srv.ctl(), l.srv.addr(), &["--wait"]);
        assert_eq!(out.status.code(), Some(0), "run {i}: {out:?}");
        assert_eq!(
            out.stdout_str(),
            "Migration started\nmigration complete: handed over\n",
            "run {i}"
        );
        assert_eq!(
            src.srv
                .wait_exit(Duration::from_secs(20))
                .and_then(|s| s.code()),
            Some(0)
        );
    }
}

// ---------------------------------------------------------------- around "started"

/// Expected: `break` while the source is still waiting for the destination's
/// greeting stops the migration: break answers "mirror stopped" (exit 0)
/// within a second or two, the `mirror` command fails (exit 1) well before
/// the 5 s greeting limit, nothing is retried (one connection only), and
/// the source serves on with no migration state.
#[test]
fn break_while_connecting_stops_the_migration() {
    let size = 4 * MIB;
    let mut src = source(size, 80);
    let fake = FakeDest::start(DestConfig::newstyle(size).then(Fault::HangBeforeGreeting));
    let (ctl, dest) = (src.srv.ctl().to_owned(), fake.addr);
    let t0 = Instant::now();
    let mirror = std::thread::spawn(move || mirror_cmd(&ctl, dest, &[]));
    assert!(
        fake.wait_for(Duration::from_secs(10), |c| !c.is_empty()),
        "never connected"
    );
    let t = Instant::now();
    let out = flexnbd(&["break", "--sock", &src.srv.ctl().display().to_string()]);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "break took {:?}",
        t.elapsed()
    );
    out.expect_success("break");
    assert_eq!(out.stdout_str().trim(), "mirror stopped");
    let m = mirror.join().unwrap();
    assert_eq!(m.status.code(), Some(1), "{m:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "mirror took {:?}",
        t0.elapsed()
    );
    assert!(m.stderr_str().contains("stopped"), "{m:?}");
    assert!(
        !fake.wait_for(Duration::from_millis(2500), |c| c.len() > 1),
        "retried after break: {:?}",
        fake.records()
    );
    let st = status_map(src.srv.ctl());
    assert_eq!(st["is_mirroring"], "false", "{st:?}");
    src.srv.assert_alive();
    let out = flexnbd(&["break", "--sock", &src.srv.ctl().display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr_str().contains("not mirroring"));
}

/// Expected: SIGTERM (or SIGINT) while a migration is connecting, or copying,
/// makes the source exit 1 (not a clean stop); SIGTERM with no migration
/// exits 0.
#[test]
fn a_signal_during_a_migration_exits_1() {
    let size = 4 * MIB;
    // While waiting for the greeting.
    let mut src = source(size, 81);
    let fake = FakeDest::start(DestConfig::newstyle(size).then(Fault::HangBeforeGreeting));
    let (ctl, dest) = (src.srv.ctl().to_owned(), fake.addr);
    let mirror = std::thread::spawn(move || mirror_cmd(&ctl, dest, &[]));
    assert!(fake.wait_for(Duration::from_secs(10), |c| !c.is_empty()));
    let st = src.srv.stop_with(SIGTERM);
    assert_eq!(st.code(), Some(1), "{}", src.srv.stderr());
    let _ = mirror.join();

    // While copying (slowly).
    let mut src = source(64 * MIB, 82);
    let l = listener(64 * MIB, &[]);
    mirror_cmd(src.srv.ctl(), l.srv.addr(), &["--max-speed", "8000000"]).expect_success("mirror");
    wait_status(src.srv.ctl(), Duration::from_secs(10), |s| {
        s["is_mirroring"] == "true"
    });
    let st = src.srv.stop_with(SIGINT);
    assert_eq!(st.code(), Some(1), "{}", src.srv.stderr());

    // No migration: a clean stop.
    let mut src = source(MIB, 83);
    src.srv.stop();
}
