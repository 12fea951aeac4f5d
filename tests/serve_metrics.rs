//! `--metrics ADDR:PORT`: Prometheus text at `/metrics`, scraped while fio
//! runs: the write counters move by exactly what fio wrote, reads by what
//! it read, errors by errno; `promtool check metrics` accepts the output;
//! gauges follow the clients; anything but `GET /metrics` is refused.

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

/// One HTTP request; the status line and the body.
fn http(addr: SocketAddr, request: &str) -> (String, String) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut all = String::new();
    c.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").expect("an HTTP reply");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    body
}

/// The samples of a scrape by their full name with labels.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

fn get(s: &HashMap<String, f64>, k: &str) -> f64 {
    *s.get(k).unwrap_or_else(|| panic!("{k} not scraped"))
}

fn fio_json(out: &CmdOutput) -> Value {
    out.expect_success("fio");
    let text = out.stdout_str();
    serde_json::from_str(&text[text.find('{').expect("fio JSON")..]).expect("fio JSON")
}

#[test]
fn counters_move_by_what_fio_did_and_promtool_accepts_them() {
    let fio = require_tool("fio");
    let promtool = require_tool("promtool");
    let dir = tempdir();
    let img = dir.path().join("img");
    create_sparse_file(&img, 32 * MIB);
    let maddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let srv = Serve::tcp(&img)
        .args(&["--metrics", &maddr.to_string()])
        .start();
    let before = samples(&scrape(maddr));
    assert_eq!(
        get(&before, "flexnbd_request_bytes_total{command=\"write\"}"),
        0.0
    );
    // The start-up probe's connection may still be closing.
    assert!(wait_until(Duration::from_secs(10), || {
        get(&samples(&scrape(maddr)), "flexnbd_clients") == 0.0
    }));

    // fio writes for a while; a scrape during the run sees it connected.
    let mut child = Command::new(&fio)
        .current_dir(dir.path())
        .args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri()),
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=16",
            "--size=32M",
            "--io_size=96M",
            "--output-format=json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen_connected = false;
    let mut moving = false;
    while child.try_wait().unwrap().is_none() {
        let s = samples(&scrape(maddr));
        seen_connected |= get(&s, "flexnbd_clients") >= 1.0;
        moving |= get(&s, "flexnbd_requests_total{command=\"write\"}") > 0.0;
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let out = CmdOutput {
        status: out.status,
        stdout: out.stdout,
        stderr: out.stderr,
    };
    let job = &fio_json(&out)["jobs"][0];
    let written = job["write"]["io_bytes"].as_u64().unwrap() as f64;
    let ios = job["write"]["total_ios"].as_u64().unwrap() as f64;
    assert_eq!(written, 96.0 * MIB as f64, "{job}");
    assert!(seen_connected && moving, "a scrape during the run saw it");

    // Then a read pass.
    let out = run(
        Command::new(&fio).current_dir(dir.path()).args([
            "--name=r",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri()),
            "--rw=randread",
            "--bs=4k",
            "--iodepth=8",
            "--size=32M",
            "--io_size=8M",
            "--output-format=json",
        ]),
        Duration::from_secs(120),
    );
    let rjob = &fio_json(&out)["jobs"][0];
    let read = rjob["read"]["io_bytes"].as_u64().unwrap() as f64;

    let text = scrape(maddr);
    let after = samples(&text);
    assert_eq!(
        get(&after, "flexnbd_request_bytes_total{command=\"write\"}"),
        written
    );
    assert_eq!(
        get(&after, "flexnbd_requests_total{command=\"write\"}"),
        ios
    );
    assert_eq!(
        get(&after, "flexnbd_request_bytes_total{command=\"read\"}"),
        read
    );
    assert_eq!(
        get(
            &after,
            "flexnbd_request_duration_seconds_count{command=\"write\"}"
        ),
        ios
    );
    assert_eq!(
        get(
            &after,
            "flexnbd_request_duration_seconds_bucket{command=\"write\",le=\"+Inf\"}"
        ),
        ios
    );
    assert!(
        get(
            &after,
            "flexnbd_request_duration_seconds_sum{command=\"write\"}"
        ) > 0.0
    );
    assert_eq!(
        get(&after, "flexnbd_request_errors_total{errno=\"EIO\"}"),
        0.0
    );
    assert_eq!(get(&after, "flexnbd_migration_state{state=\"none\"}"), 1.0);
    assert_eq!(get(&after, "flexnbd_image_size_bytes"), 32.0 * MIB as f64);

    // promtool accepts the exposition as it is.
    let mut p = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn errors_are_counted_by_errno_and_other_paths_refused() {
    let dir = tempdir();
    let img = dir.path().join("img");
    create_sparse_file(&img, MIB);
    let maddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let srv = Serve::tcp(&img)
        .args(&["--read-only", "--metrics", &maddr.to_string()])
        .start();
    // A write to a read-only export: EPERM.
    let port = srv.addr().port().to_string();
    let out = run_with_stdin(
        Command::new(bin()).args([
            "write",
            "--addr",
            "127.0.0.1",
            "--port",
            &port,
            "--from",
            "0",
            "--size",
            "512",
        ]),
        Some(vec![7u8; 512]),
        Duration::from_secs(30),
    );
    assert!(!out.success());
    let s = samples(&scrape(maddr));
    assert_eq!(
        get(&s, "flexnbd_request_errors_total{errno=\"EPERM\"}"),
        1.0
    );
    assert_eq!(
        get(&s, "flexnbd_request_bytes_total{command=\"write\"}"),
        0.0
    );

    let (status, _) = http(maddr, "GET /other HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = http(maddr, "POST /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    // A head that never ends is cut off, and the endpoint still answers.
    let mut c = TcpStream::connect(maddr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(&vec![b'a'; 20_000]);
    let mut reply = String::new();
    let _ = c.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    assert!(!scrape(maddr).is_empty());

    // A bad address is refused at start.
    let out = run(
        Command::new(bin())
            .args([
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                "1",
                "--metrics",
                "localhost",
            ])
            .arg("--file")
            .arg(&img),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr_str().contains("not an IP address and port"),
        "{}",
        out.stderr_str()
    );
}
