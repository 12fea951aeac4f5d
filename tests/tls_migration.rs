//! TLS for the migration link and through the proxy: a live migration
//! under a writer to `listen --tls require --tls-verify-peer` (checksums
//! equal, every acknowledged write present), a sender without a client
//! certificate refused with the destination untouched, and the proxy with
//! TLS towards its clients and to its upstream.

mod common;

use common::certs::{nbds_uri, Certs};
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// A migration over TLS while a writer (itself on TLS) keeps 8 writes in
/// flight: the destination (`--tls require --tls-verify-peer`) ends equal
/// to the source's final image, every acknowledged write is in it, and it
/// logged the source's certificate.
#[test]
fn migration_over_tls_under_a_writer() {
    let certs = Certs::new();
    let size = 256 * MIB;
    let dir = tempdir();
    let src_file = dir.path().join("src.img");
    let dst_file = dir.path().join("dst.img");
    create_random_file(&src_file, size, 0x715);
    create_sparse_file(&dst_file, size);
    let cdir = certs.server.display().to_string();
    let mut src = Daemon::serve(&src_file, &dir.path().join("src.sock"))
        .args(&["--tls", "on", "--tls-certificates", &cdir])
        .start();
    let dst = Daemon::listen(&dst_file, &dir.path().join("dst.sock"))
        .args(&[
            "--tls",
            "require",
            "--tls-verify-peer",
            "--tls-certificates",
            &cdir,
        ])
        .start();
    let uri = nbds_uri(src.addr().port(), &certs.client);
    let mut writer = LoadWriter::start(&uri, 8, 5);
    let t0 = Instant::now();
    // The server's own directory holds its client certificate.
    mirror_cmd(src.ctl(), dst.addr(), &["--tls"]).expect_success("mirror --tls");
    let st = src.wait_exit(Duration::from_secs(120));
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(0),
        "source did not hand over; log:\n{}",
        src.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            try_status(dst.ctl()).is_some_and(|s| s["has_control"] == "true")
        }),
        "destination never took control; log:\n{}",
        dst.stderr()
    );
    let r = writer.finish(Duration::from_secs(30));
    eprintln!(
        "TLS migration of {size} bytes in {:?}; writer: {} acknowledged",
        t0.elapsed(),
        r["n_ok"]
    );
    assert_eq!(
        md5_file(&dst_file),
        md5_file(&src_file),
        "destination vs source"
    );
    let f = std::fs::File::open(&dst_file).unwrap();
    let checked = check_acknowledged_writes(&r, |b| {
        let mut buf = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, b * 4096).unwrap();
        buf
    });
    assert!(checked > 500, "{checked} blocks checked");
    assert!(
        dst.stderr()
            .contains("peer certificate: CN=flexnbd test client"),
        "{}",
        dst.stderr()
    );
}

/// A sender without a client certificate (or with a plain connection) is
/// refused by `listen --tls require --tls-verify-peer`: the migration
/// fails, the destination keeps waiting and its image stays untouched;
/// then a sender with the certificate succeeds.
#[test]
fn sender_without_a_certificate_is_refused() {
    let certs = Certs::new();
    let size = 16 * MIB;
    let cdir = certs.server.display().to_string();
    let mut dst = listener(
        size,
        &[
            "--tls",
            "require",
            "--tls-verify-peer",
            "--tls-certificates",
            &cdir,
        ],
    );
    let untouched = md5_file(&dst.file);
    for extra in [
        vec![
            "--tls",
            "--tls-certificates",
            certs.anonymous.to_str().unwrap(),
        ],
        vec![],
    ] {
        let mut src = source(size, 0x5e);
        let mut args = vec!["--retries", "0", "--wait"];
        args.extend_from_slice(&extra);
        let out = mirror_cmd(src.srv.ctl(), dst.srv.addr(), &args);
        assert!(!out.success(), "migration {extra:?} was let in");
        dst.assert_waiting();
        assert_eq!(md5_file(&dst.file), untouched, "image written by {extra:?}");
        src.srv.assert_alive();
    }
    assert!(
        dst.srv.stderr().contains("TLS handshake failed"),
        "{}",
        dst.srv.stderr()
    );
    assert!(
        dst.srv.stderr().contains("TLS is required"),
        "the plain sender: {}",
        dst.srv.stderr()
    );
    // The real one, with the certificate, gets through.
    let mut src = source_with(size, 0x5f, &["--tls", "on", "--tls-certificates", &cdir]);
    mirror_cmd(src.srv.ctl(), dst.srv.addr(), &["--tls"]).expect_success("mirror --tls");
    dst.assert_handed_over(&mut src);
}

/// The proxy with `--tls require` towards its clients and `--conn-tls` to
/// an upstream with `--tls require --tls-verify-peer`: nbdcopy in and out
/// through it, checksums equal; a plain client is refused by the proxy.
#[test]
fn proxy_with_tls_on_both_sides() {
    require_tool("nbdcopy");
    let certs = Certs::new();
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    create_random_file(&img, 64 * MIB, 0x9e);
    create_random_file(&src, 64 * MIB, 0x9f);
    let cdir = certs.server.display().to_string();
    let upstream = Serve::tcp(&img)
        .args(&[
            "--tls",
            "require",
            "--tls-verify-peer",
            "--tls-certificates",
            &cdir,
        ])
        .start();
    let up = upstream.addr();
    let conn = [
        "--conn-addr".to_string(),
        up.ip().to_string(),
        "--conn-port".to_string(),
        up.port().to_string(),
    ];
    // Without --conn-tls the upstream refuses the proxy, which will not start.
    let out = run(
        Command::new(bin())
            .args(["proxy", "--addr", "127.0.0.1", "--port"])
            .arg(free_port().to_string())
            .args(&conn),
        TOOL_TIMEOUT,
    );
    assert!(
        !out.success(),
        "the proxy started without TLS to its upstream"
    );
    assert!(out.stderr_str().contains("TLS"), "{}", out.stderr_str());

    let proxy = Serve::proxy(&conn)
        .args(&["--conn-tls", "--conn-tls-certificates", &cdir])
        .args(&["--tls", "require", "--tls-certificates", &cdir])
        .start();
    let uri = nbds_uri(proxy.port.unwrap(), &certs.client);
    run(Command::new("nbdcopy").arg(&uri).arg(&back), TOOL_TIMEOUT)
        .expect_success("nbdcopy out through the proxy");
    assert_eq!(md5_file(&back), md5_file(&img));
    run(
        Command::new("nbdcopy").arg("--flush").arg(&src).arg(&uri),
        TOOL_TIMEOUT,
    )
    .expect_success("nbdcopy in through the proxy");
    assert_eq!(md5_file(&img), md5_file(&src));
    let plain = run(Command::new("nbdinfo").arg(proxy.uri()), TOOL_TIMEOUT);
    assert!(!plain.success(), "the proxy served a plain client");
}
