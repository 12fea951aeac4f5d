//! Running under systemd: socket activation (`LISTEN_FDS`, by
//! `systemd-socket-activate`, TCP and unix, real clients reading through
//! the passed socket) and readiness (`NOTIFY_SOCKET`: READY=1 with a
//! STATUS once listening, STOPPING=1 at shutdown), and descriptors that are
//! not listening sockets refused with a clear error.

mod common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `systemd-socket-activate -l LISTEN flexnbd serve --file IMG`, which
/// execs flexnbd (same pid) with the socket as descriptor 3.
fn activated(listen: &str, img: &std::path::Path) -> Child {
    Command::new(require_tool("systemd-socket-activate"))
        .args(["-l", listen])
        .arg(bin())
        .args(["serve", "--file"])
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn copy_out(uri: &str) -> Option<Vec<u8>> {
    let out = run(
        Command::new(require_tool("nbdcopy")).args([uri, "-"]),
        TOOL_TIMEOUT,
    );
    out.success().then_some(out.stdout)
}

#[test]
fn tcp_and_unix_sockets_passed_by_the_service_manager_are_served() {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    create_random_file(&img, 2 * MIB, 0x5d5d);
    let want = read_file(&img);
    let port = free_port();
    let sock = dir.path().join("nbd.sock");
    for (listen, uri) in [
        (
            format!("127.0.0.1:{port}"),
            format!("nbd://127.0.0.1:{port}"),
        ),
        (
            sock.display().to_string(),
            format!("nbd+unix:///?socket={}", sock.display()),
        ),
    ] {
        let mut child = activated(&listen, &img);
        // The first connection makes systemd-socket-activate exec flexnbd,
        // which takes it from the passed socket; then more come.
        let mut got = None;
        assert!(
            wait_until(Duration::from_secs(20), || {
                got = copy_out(&uri);
                got.is_some()
            }),
            "no copy through {listen}"
        );
        assert_bytes_eq(&got.unwrap(), &want, "first copy");
        let out = run(Command::new("nbdinfo").args(["--size", &uri]), TOOL_TIMEOUT);
        out.expect_success("nbdinfo through the passed socket");
        assert_eq!(out.stdout_str().trim(), (2 * MIB).to_string());
        send_signal(child.id(), libc::SIGTERM);
        let st = wait_child(&mut child, Duration::from_secs(20)).expect("exited");
        assert_eq!(st.code(), Some(0), "{listen}");
    }
}

#[test]
fn readiness_and_stopping_reach_the_notify_socket() {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    create_sparse_file(&img, MIB);
    let notify = dir.path().join("notify");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let port = free_port().to_string();
    let mut child = Command::new(bin())
        .args(["serve", "--addr", "127.0.0.1", "--port", &port, "--file"])
        .arg(&img)
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = rx.recv(&mut buf).expect("READY=1");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    let status = format!("STATUS=serving {} on 127.0.0.1:{port}", img.display());
    assert!(msg.lines().any(|l| l == status), "{msg}");
    // Ready means listening: a client gets in at once.
    let out = run(
        Command::new("nbdinfo").args(["--size", &format!("nbd://127.0.0.1:{port}")]),
        TOOL_TIMEOUT,
    );
    out.expect_success("nbdinfo after READY=1");
    send_signal(child.id(), libc::SIGTERM);
    let n = rx.recv(&mut buf).expect("STOPPING=1");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg}");
    assert_eq!(
        wait_child(&mut child, Duration::from_secs(20)).and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn a_passed_descriptor_that_is_not_a_listening_socket_is_refused() {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    create_sparse_file(&img, MIB);
    let script = format!(
        "LISTEN_PID=$$ LISTEN_FDS=1 exec '{}' serve --file '{}' 3<'{}'",
        bin().display(),
        img.display(),
        img.display()
    );
    let out = run(
        Command::new("sh").args(["-c", &script]),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr_str());
    assert!(
        out.stderr_str()
            .contains("socket activation: descriptor 3 is not a listening stream socket"),
        "{}",
        out.stderr_str()
    );
}

#[test]
fn the_proxy_takes_its_socket_from_the_service_manager_too() {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    create_random_file(&img, MIB, 0x5d5e);
    let up = Serve::tcp(&img).start();
    let sock = dir.path().join("proxy.sock");
    let mut child = Command::new(require_tool("systemd-socket-activate"))
        .arg("-l")
        .arg(&sock)
        .arg(bin())
        .args(["proxy", "--conn-addr", "127.0.0.1", "--conn-port"])
        .arg(up.addr().port().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let mut got = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            got = copy_out(&uri);
            got.is_some()
        }),
        "no copy through the activated proxy"
    );
    assert_bytes_eq(&got.unwrap(), &read_file(&img), "through the proxy");
    send_signal(child.id(), libc::SIGTERM);
    assert_eq!(
        wait_child(&mut child, Duration::from_secs(20)).and_then(|s| s.code()),
        Some(0)
    );
}
