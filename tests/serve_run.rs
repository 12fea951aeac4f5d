//! `serve --run CMD` (captive mode): CMD gets the server's address in
//! `$uri`, `$nbd`, `$port`, `$unixsocket`, `$exportname`; the server exits
//! with CMD's status once it ends and is gone afterwards (no socket, no
//! port); stopping the server stops CMD.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn serve_run(img: &std::path::Path, listen: &[&str], cmd: &str) -> CmdOutput {
    run(
        Command::new(bin())
            .arg("serve")
            .arg("--file")
            .arg(img)
            .args(listen)
            .args(["--run", cmd]),
        LIMIT,
    )
}

#[test]
fn qemu_img_converts_through_a_private_socket_and_the_status_passes_through() {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    create_random_file(&img, 3 * MIB, 0x5255_4e31);
    let out_img = dir.path().join("out.qcow2");
    require_tool("qemu-img");
    let cmd = format!(
        "qemu-img convert -O qcow2 \"$uri\" '{}' && echo \"$unixsocket\" && exit 7",
        out_img.display()
    );
    let out = serve_run(&img, &["--unix", "-"], &cmd);
    assert_eq!(out.status.code(), Some(7), "{}", out.stderr_str());
    let sock = out.stdout_str().trim().to_owned();
    assert!(sock.ends_with("/socket"), "{sock}");
    // The server is gone: its private directory with it.
    let dirname = std::path::Path::new(&sock).parent().unwrap();
    assert!(!dirname.exists(), "{} left behind", dirname.display());
    // The copy is the image.
    let raw = dir.path().join("back.raw");
    run(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&out_img)
            .arg(&raw),
        LIMIT,
    )
    .expect_success("qemu-img convert back");
    assert_eq!(md5_file(&raw), md5_file(&img));
}

#[test]
fn tcp_names_and_signals() {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    create_random_file(&img, MIB, 0x5255_4e32);
    let port = free_port().to_string();
    let listen = [
        "--addr",
        "127.0.0.1",
        "--port",
        &port,
        "--export-name",
        "d1",
    ];
    // The environment names this server; nbdinfo reaches it by $uri.
    let out = serve_run(
        &img,
        &listen,
        "nbdinfo --size \"$uri\" && echo \"$port $exportname $nbd $tls\"",
    );
    out.expect_success("serve --run nbdinfo");
    assert_eq!(
        out.stdout_str(),
        format!("{MIB}\n{port} d1 nbd:127.0.0.1:{port}:exportname=d1 0\n")
    );
    // Afterwards nothing listens on the port.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err());

    // A command killed by a signal: 128 + the signal, as a shell says.
    let out = serve_run(&img, &listen, "kill -9 $$");
    assert_eq!(out.status.code(), Some(128 + 9), "{}", out.stderr_str());
    // A command that cannot run: the shell's 127.
    let out = serve_run(&img, &listen, "/no/such/program");
    assert_eq!(out.status.code(), Some(127), "{}", out.stderr_str());
}

#[test]
fn stopping_the_server_stops_the_command() {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    create_sparse_file(&img, MIB);
    let pidfile = dir.path().join("cmd.pid");
    let cmd = format!("echo $$ > '{}'; exec sleep 300", pidfile.display());
    let mut child = Command::new(bin())
        .arg("serve")
        .arg("--file")
        .arg(&img)
        .args(["--unix", "-", "--run", &cmd])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
    }));
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    send_signal(child.id(), libc::SIGTERM);
    let st = wait_child(&mut child, Duration::from_secs(20)).expect("server exited");
    assert!(st.code().is_some(), "{st:?}");
    // The sleep was stopped with it (and reaped by the server).
    assert!(
        wait_until(Duration::from_secs(5), || !std::path::Path::new(&format!(
            "/proc/{pid}"
        ))
        .exists()),
        "the command outlived the server"
    );
}
