//! Life cycle of `flexnbd serve`: readiness, signals and clean exit, answers
//! to requests in flight at shutdown, socket files, command-line errors, help
//! and the log format and levels.

mod common;

use common::*;
use std::io::BufRead;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn image(dir: &Path, size: u64) -> std::path::PathBuf {
    let img = dir.join("img");
    create_random_file(&img, size, 0x11fe);
    img
}

#[test]
fn sigterm_sigint_sigquit_exit_zero_and_remove_sockets() {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    for (name, sig) in [
        ("SIGTERM", SIGTERM),
        ("SIGINT", SIGINT),
        ("SIGQUIT", SIGQUIT),
    ] {
        let ctl = dir.path().join("ctl.sock");
        let unix = dir.path().join("nbd.sock");
        let mut srv = Serve {
            unix: Some(unix.clone()),
            ..Serve::tcp(&img)
        }
        .control(&ctl)
        .start();
        assert!(ctl.exists() && unix.exists());
        // Served on both listeners.
        let mut c = Raw::simple(srv.addr());
        assert_bytes_eq(&c.read(1, 0, 64), &read_file_at(&img, 0, 64), "tcp read");
        c.req(CMD_DISC, 0, 0, 0, 0);
        let out = run(
            Command::new(require_tool("nbdinfo")).args(["--size", &srv.unix_uri()]),
            TOOL_TIMEOUT,
        );
        out.expect_success("nbdinfo over unix");
        assert_eq!(out.stdout_str().trim(), MIB.to_string());

        let st = srv.stop_with(sig);
        assert_eq!(
            st.code(),
            Some(0),
            "{name}: exit status; stderr:\n{}",
            srv.stderr()
        );
        assert!(!ctl.exists(), "{name}: control socket left behind");
        assert!(!unix.exists(), "{name}: unix socket left behind");
        assert!(
            std::net::TcpStream::connect_timeout(&srv.addr(), Duration::from_secs(2)).is_err(),
            "{name}: still listening"
        );
    }
}

#[test]
fn idle_clients_do_not_hold_up_shutdown() {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let mut srv = Serve::tcp(&img).control(&dir.path().join("ctl")).start();
    let mut handshaking = Raw::connect(srv.addr());
    handshaking.newstyle_greeting();
    let mut idle = Raw::simple(srv.addr());
    let mut half = Raw::simple(srv.addr());
    half.send(&request(CMD_READ, 0, 1, 0, 512)[..10]);
    let t = Instant::now();
    srv.stop();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "shutdown took {took:?} with idle clients"
    );
    assert_eq!(handshaking.expect_closed(), Vec::<u8>::new());
    assert_eq!(idle.expect_closed(), Vec::<u8>::new());
    assert_eq!(half.expect_closed(), Vec::<u8>::new());
}

#[test]
fn writes_answered_before_sigterm_are_in_the_file() {
    require_python_nbd();
    let dir = tempdir();
    let img = dir.path().join("img");
    const N: u64 = 1024;
    const BS: u64 = 65536;
    create_sparse_file(&img, N * BS);
    let mut srv = Serve::tcp(&img).control(&dir.path().join("ctl")).start();
    // Many FUA writes in flight; the test signals the server once the first
    // one is answered, then the client collects every outcome.
    let script = format!(
        r#"{PY_PRELUDE}
import time
h = connect(sys.argv[1])
N, BS = {N}, {BS}
bufs, cookies = [], []
for i in range(N):
    b = nbd.Buffer.from_bytearray(bytearray([i % 251 + 1]) * BS)
    bufs.append(b)
    cookies.append(h.aio_pwrite(b, i * BS, flags=nbd.CMD_FLAG_FUA))
def step():
    try:
        h.poll(100)
    except nbd.Error:
        pass
ok, failed = [], []
pending = list(range(N))
def collect():
    global pending
    left = []
    for i in pending:
        try:
            if h.aio_command_completed(cookies[i]):
                ok.append(i)
            else:
                left.append(i)
        except nbd.Error:
            failed.append(i)
    pending = left
deadline = time.monotonic() + 60
while not ok and not failed and time.monotonic() < deadline:
    step()
    collect()
print("SENT", flush=True)
while pending and time.monotonic() < deadline:
    step()
    collect()
    if h.aio_is_dead() or h.aio_is_closed():
        collect()
        failed.extend(pending)
        pending = []
out({{"ok": ok, "failed": failed, "pending": pending}})
"#
    );
    let mut child = Command::new(PYTHON)
        .arg("-c")
        .arg(&script)
        .arg(srv.uri())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(60));
    if first.as_deref() != Ok("SENT") {
        let _ = terminate(&mut child, Duration::from_secs(2));
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
        panic!("client did not start: {first:?}\n{err}");
    }
    srv.signal(SIGTERM);
    let last = rx.recv_timeout(Duration::from_secs(90));
    let status = match wait_child(&mut child, Duration::from_secs(30)) {
        Some(s) => s,
        None => terminate(&mut child, Duration::from_secs(5)),
    };
    let _ = reader.join();
    let last = last.expect("client result");
    assert!(status.success(), "client exited with {status:?}");
    let st = srv
        .wait_exit(STOP_TIMEOUT)
        .expect("server exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "stderr:\n{}", srv.stderr());

    let r: serde_json::Value = serde_json::from_str(&last).expect("JSON");
    let ok: Vec<u64> = r["ok"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let failed = r["failed"].as_array().unwrap().len() as u64;
    eprintln!("{} writes answered, {failed} not", ok.len());
    assert_eq!(
        r["pending"],
        serde_json::json!([]),
        "every write has an outcome"
    );
    assert_eq!(ok.len() as u64 + failed, N);
    assert!(!ok.is_empty(), "at least the first write was answered");
    let data = read_file(&img);
    for i in ok {
        let want = (i % 251 + 1) as u8;
        let block = &data[(i * BS) as usize..((i + 1) * BS) as usize];
        assert!(
            block.iter().all(|&b| b == want),
            "write {i} was answered but is not in the file"
        );
    }
}

#[test]
fn stale_socket_files_are_replaced_and_other_files_refused() {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let ctl = dir.path().join("ctl");
    let unix = dir.path().join("nbd");
    // Sockets left behind by a crashed run (bound, nobody listening).
    drop(UnixListener::bind(&ctl).unwrap());
    drop(UnixListener::bind(&unix).unwrap());
    assert!(ctl.exists() && unix.exists());
    let mut srv = Serve::unix(&img, &unix).control(&ctl).start();
    let out = run(
        Command::new(require_tool("nbdinfo")).args(["--size", &srv.unix_uri()]),
        TOOL_TIMEOUT,
    );
    out.expect_success("nbdinfo");
    assert_eq!(out.stdout_str().trim(), MIB.to_string());
    srv.stop();
    assert!(!ctl.exists() && !unix.exists());

    // A regular file in the way of the unix socket: refused, left alone.
    std::fs::write(&unix, b"precious").unwrap();
    let out = run(
        Command::new(bin())
            .args(["serve", "--file"])
            .arg(&img)
            .arg("--unix")
            .arg(&unix),
        Duration::from_secs(20),
    );
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(std::fs::read(&unix).unwrap(), b"precious");
    assert_eq!(out.stderr_str().lines().count(), 1, "{out:?}");

    // A second server on the same unix socket: refused, the first one keeps it.
    std::fs::remove_file(&unix).unwrap();
    let mut first = Serve::unix(&img, &unix).start();
    let out = run(
        Command::new(bin())
            .args(["serve", "--file"])
            .arg(&img)
            .arg("--unix")
            .arg(&unix),
        Duration::from_secs(20),
    );
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    let info = run(
        Command::new(require_tool("nbdinfo")).args(["--size", &first.unix_uri()]),
        TOOL_TIMEOUT,
    );
    info.expect_success("nbdinfo on the first server");
    first.stop();
}

/// Runs `flexnbd ARGS` expecting failure with exactly one stderr line that
/// mentions `needle`; returns what was wrong, if anything.
fn bad_args(args: &[&str], needle: &str) -> Result<(), String> {
    let out = run(Command::new(bin()).args(args), Duration::from_secs(20));
    let err = out.stderr_str();
    let lines: Vec<&str> = err.lines().collect();
    if out.status.code().is_none() {
        return Err(format!("{args:?} died of a signal: {:?}", out.status));
    }
    if out.status.code() == Some(0) {
        return Err(format!("{args:?} succeeded"));
    }
    if lines.len() != 1 || lines[0].trim().is_empty() {
        return Err(format!(
            "{args:?}: expected exactly one line on stderr, got:\n{err}"
        ));
    }
    if !lines[0].contains(needle) {
        return Err(format!(
            "{args:?}: the error line should mention {needle:?}: {err}"
        ));
    }
    if !out.stdout.is_empty() {
        return Err(format!("{args:?}: printed on stdout: {}", out.stdout_str()));
    }
    Ok(())
}

#[test]
fn bad_command_lines_fail_with_one_clear_line() {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let img_s = img.display().to_string();
    let port = free_port().to_string();
    let missing = dir.path().join("missing.img").display().to_string();
    let ctl = dir.path().join("ctl");
    let ctl_s = ctl.display().to_string();
    let dir_s = dir.path().display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["serve", "--addr", "127.0.0.1", "--port", &port],
            "--file",
        ),
        (
            vec![
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                &port,
                "--file",
                &missing,
                "--sock",
                &ctl_s,
            ],
            &missing,
        ),
        (
            vec![
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                &port,
                "--file",
                &dir_s,
            ],
            &dir_s,
        ),
        (
            vec![
                "serve", "--addr", "1.2.3", "--port", &port, "--file", &img_s,
            ],
            "1.2.3",
        ),
        // --quiet does not silence the error itself.
        (
            vec![
                "serve", "-q", "--addr", "1.2.4", "--port", &port, "--file", &img_s,
            ],
            "1.2.4",
        ),
        (
            vec![
                "serve",
                "--addr",
                "localhost",
                "--port",
                &port,
                "--file",
                &img_s,
            ],
            "localhost",
        ),
        (
            vec![
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                "70000",
                "--file",
                &img_s,
            ],
            "70000",
        ),
        (
            vec![
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                "-1",
                "--file",
                &img_s,
            ],
            "-1",
        ),
        (
            vec![
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                &port,
                "--file",
                &img_s,
                "nonsense",
            ],
            "nonsense",
        ),
        (
            vec![
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                &port,
                "--file",
                &img_s,
                "127.0.0.1/0",
            ],
            "127.0.0.1/0",
        ),
        (
            vec![
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                &port,
                "--file",
                &img_s,
                "10.0.0.0/33",
            ],
            "10.0.0.0/33",
        ),
        (vec!["serve", "--port", &port, "--file", &img_s], "--addr"),
        (
            vec!["serve", "--addr", "127.0.0.1", "--file", &img_s],
            "--port",
        ),
        (vec!["serve", "--file", &img_s], "--addr"),
        (
            vec![
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                &port,
                "--file",
                &img_s,
                "--bogus",
            ],
            "--bogus",
        ),
    ];
    let mut problems: Vec<String> = cases
        .iter()
        .filter_map(|(args, needle)| bad_args(args, needle).err())
        .collect();
    if ctl.exists() {
        problems.push("a failed start left a control socket".into());
    }
    // A port that is already taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = taken.local_addr().unwrap().port().to_string();
    problems.extend(
        bad_args(
            &[
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                &p,
                "--file",
                &img_s,
            ],
            &p,
        )
        .err(),
    );
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn help_lists_commands_and_options() {
    let out = run(Command::new(bin()).arg("help"), Duration::from_secs(20));
    out.expect_success("flexnbd help");
    let text = out.stdout_str();
    for cmd in [
        "serve", "listen", "mirror", "break", "acl", "status", "read", "write",
    ] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(cmd)),
            "`flexnbd help` does not list {cmd}:\n{text}"
        );
    }
    for args in [
        &["help", "serve"][..],
        &["serve", "-h"],
        &["serve", "--help"],
    ] {
        let out = run(Command::new(bin()).args(args), Duration::from_secs(20));
        out.expect_success(&format!("flexnbd {args:?}"));
        let text = out.stdout_str();
        for opt in [
            "--addr",
            "--port",
            "--file",
            "--sock",
            "--default-deny",
            "--unix",
            "--read-only",
            "--oldstyle",
            "--verbose",
            "--quiet",
        ] {
            assert!(text.contains(opt), "{args:?}: help lacks {opt}:\n{text}");
        }
    }
}

/// Runs a server with `flags`, one client session, then SIGTERM; returns the
/// server's pid and stderr.
fn log_of(flags: &[&str]) -> (u32, String) {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let mut srv = Serve::tcp(&img)
        .control(&dir.path().join("ctl"))
        .args(flags)
        .start();
    let mut c = Raw::simple(srv.addr());
    c.read(1, 0, 512);
    c.req(CMD_DISC, 0, 0, 0, 0);
    c.expect_closed();
    let pid = srv.pid();
    srv.stop();
    (pid, srv.stderr())
}

fn levels(log: &str) -> Vec<char> {
    log.lines()
        .map(|l| {
            log_level(l).unwrap_or_else(|| panic!("log line in the wrong format: {l:?}\n{log}"))
        })
        .collect()
}

#[test]
fn verbose_logs_info_lines_in_the_documented_format() {
    for flags in [
        &["-v"][..],
        &["--verbose"],
        &["-q", "-v"],
        &["--quiet", "--verbose"],
    ] {
        let (pid, log) = log_of(flags);
        let lv = levels(&log);
        assert!(lv.contains(&'I'), "{flags:?}: no I lines:\n{log}");
        for l in log.lines() {
            let p: u32 = l[2..].split(' ').next().unwrap().parse().unwrap();
            assert_eq!(p, pid, "{flags:?}: pid field of {l:?}");
        }
        assert!(log.contains("listening on"), "{flags:?}:\n{log}");
    }
}

#[test]
fn quiet_and_default_print_no_info() {
    for flags in [
        &["-q"][..],
        &["--quiet"],
        &["-v", "-q"],
        &["--verbose", "--quiet"],
    ] {
        let (_, log) = log_of(flags);
        let lv = levels(&log);
        assert!(
            !lv.iter().any(|l| matches!(l, 'D' | 'I' | 'W')),
            "{flags:?}: quiet must print no D/I/W lines:\n{log}"
        );
    }
    let (_, log) = log_of(&[]);
    let lv = levels(&log);
    assert!(
        !lv.iter().any(|l| matches!(l, 'D' | 'I')),
        "default level must print no D/I lines:\n{log}"
    );
}

#[test]
fn replies_at_sigterm_are_whole_and_answered_writes_landed() {
    let dir = tempdir();
    let img = dir.path().join("img");
    create_sparse_file(&img, 16 * MIB);
    let mut srv = Serve::tcp(&img).control(&dir.path().join("ctl")).start();
    let mut c = Raw::simple(srv.addr());
    // 128 FUA writes of 64 KiB (each waits for the disk) with reads between them.
    let mut batch = Vec::new();
    for i in 0..128u64 {
        batch.extend_from_slice(&request(CMD_WRITE, 1, i, i * 65536, 65536));
        batch.extend_from_slice(&vec![(i % 250 + 1) as u8; 65536]);
        batch.extend_from_slice(&request(CMD_READ, 0, 1000 + i, 15 * MIB, 4096));
    }
    let mut w = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut w, &batch);
    });
    // One whole reply (and the data of a successful read), or None at the close.
    let next = |c: &mut Raw| -> Option<(u32, u64)> {
        match c.read_n(4) {
            Ok(m) => {
                assert_eq!(be32(&m, 0), SIMPLE_MAGIC, "reply magic");
                let rest = c.read_exact(12);
                let (error, cookie) = (be32(&rest, 0), be64(&rest, 4));
                if cookie >= 1000 && error == 0 {
                    let d = c.read_exact(4096);
                    assert!(d.iter().all(|&b| b == 0), "read data");
                }
                Some((error, cookie))
            }
            Err(Eof::Closed(0)) | Err(Eof::Reset(0)) => None,
            Err(e) => panic!("a reply was cut off: {e:?}"),
        }
    };
    // Signal once the first reply is in: the rest is in flight.
    let mut replies = vec![next(&mut c).expect("first reply")];
    srv.signal(SIGTERM);
    while let Some(r) = next(&mut c) {
        replies.push(r);
    }
    let _ = sender.join();
    let st = srv.wait_exit(STOP_TIMEOUT).expect("server exits");
    assert_eq!(st.code(), Some(0));
    let data = read_file(&img);
    let mut ok_writes = 0;
    let mut shutdown_errors = 0;
    for &(error, cookie) in &replies {
        match error {
            0 => {}
            108 => {
                shutdown_errors += 1;
                continue;
            }
            e => panic!("cookie {cookie}: unexpected error {e}"),
        }
        if cookie < 1000 {
            ok_writes += 1;
            let want = (cookie % 250 + 1) as u8;
            let block = &data[(cookie * 65536) as usize..][..65536];
            assert!(
                block.iter().all(|&b| b == want),
                "answered write {cookie} missing from the file"
            );
        }
    }
    eprintln!(
        "{} of 256 requests answered ({ok_writes} writes ok, {shutdown_errors} ESHUTDOWN) before the close",
        replies.len()
    );
}

#[test]
fn addr_with_a_slash_is_a_unix_socket() {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let path = dir.path().join("via-addr.sock");
    let ctl = dir.path().join("ctl");
    let mut srv = Serve {
        file: img.clone(),
        sock: Some(ctl.clone()),
        extra: vec!["--addr".into(), path.display().to_string()],
        ..Serve::default()
    }
    .start();
    let out = run(
        Command::new(require_tool("nbdinfo"))
            .args(["--size", &format!("nbd+unix:///?socket={}", path.display())]),
        TOOL_TIMEOUT,
    );
    out.expect_success("nbdinfo");
    assert_eq!(out.stdout_str().trim(), MIB.to_string());
    srv.stop();
    assert!(!path.exists(), "unix socket removed at exit");
}

#[test]
fn empty_and_odd_sized_files() {
    let dir = tempdir();
    for size in [0u64, 1, 1000, 4097] {
        let img = dir.path().join(format!("img{size}"));
        create_random_file(&img, size, size);
        let mut srv = Serve::tcp(&img).start();
        let v = nbdinfo_json(&srv.uri());
        assert_eq!(v["exports"][0]["export-size"].as_u64(), Some(size), "{v}");
        let r = python_json(
            "h = connect(sys.argv[1], strict=0)\nS = h.get_size()\n\
             out({'all': S == 0 or h.pread(S, 0) == file_bytes(sys.argv[2], 0, S),\n\
                  'past': server_err(h.pread, 512, S)})",
            &[srv.uri(), img.display().to_string()],
            TOOL_TIMEOUT,
        );
        assert_eq!(r["all"], true, "size {size}");
        assert_eq!(r["past"], EINVAL, "size {size}");
        srv.stop();
    }
}

#[test]
fn a_second_server_cannot_take_a_live_control_socket() {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let ctl = dir.path().join("ctl");
    let mut first = Serve::tcp(&img).control(&ctl).start();
    let port = free_port().to_string();
    // Another image: the image lock would refuse the same one first.
    let other = dir.path().join("other");
    create_sparse_file(&other, MIB);
    let out = run(
        Command::new(bin())
            .args(["serve", "--addr", "127.0.0.1", "--port", &port, "--file"])
            .arg(&other)
            .arg("--sock")
            .arg(&ctl),
        Duration::from_secs(20),
    );
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stderr_str().lines().count(), 1, "{out:?}");
    // The socket still belongs to the first server.
    let st = run(
        Command::new(bin()).args(["status", "--sock"]).arg(&ctl),
        Duration::from_secs(20),
    );
    st.expect_success("flexnbd status");
    assert!(
        st.stdout_str()
            .split_whitespace()
            .any(|kv| kv == format!("pid={}", first.pid())),
        "{}",
        st.stdout_str()
    );
    first.stop();
    assert!(!ctl.exists());
}

/// Runs `flexnbd MODE --addr 127.0.0.1 --port FREE --file IMG EXTRA...` and
/// expects it to be refused at start: exit 1, one line on stderr, never
/// listening. Returns that line.
#[track_caller]
fn refused_start(mode: &str, img: &Path, extra: &[&str]) -> String {
    let port = free_port();
    let out = run(
        Command::new(bin())
            .args([
                mode,
                "--addr",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--file",
            ])
            .arg(img)
            .args(extra),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = out.stderr_str();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!accepts(format!("127.0.0.1:{port}").parse().unwrap()));
    err
}

/// Expected: while one `serve` has an image, a second `serve` of it (read-
/// write or read-only) is refused at start with a message naming the first
/// one's pid and that it is writing; the first keeps serving unharmed. Once
/// the first has exited, the image can be served again.
#[test]
fn a_second_writer_of_an_image_is_refused_naming_the_holder() {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let mut first = Serve::tcp(&img).start();
    for extra in [&[][..], &["--read-only"][..]] {
        let err = refused_start("serve", &img, extra);
        assert!(
            err.contains(&format!("pid {}", first.pid())) && err.contains("is writing to it"),
            "{err}"
        );
    }
    let mut c = Raw::simple(first.addr());
    assert_bytes_eq(
        &c.read(1, 0, 4096),
        &read_file_at(&img, 0, 4096),
        "first still serves",
    );
    c.req(CMD_DISC, 0, 2, 0, 0);
    first.stop();
    let mut again = Serve::tcp(&img).start();
    again.stop();
}

/// Expected: a `serve` of the file a `listen` is still receiving into is
/// refused, naming the listener's pid.
#[test]
fn serving_a_file_a_listener_receives_into_is_refused() {
    let dir = tempdir();
    let img = dir.path().join("dst.img");
    create_sparse_file(&img, MIB);
    let l = Daemon::listen(&img, &dir.path().join("dst.sock")).start();
    let err = refused_start("serve", &img, &[]);
    assert!(err.contains(&format!("pid {}", l.pid())), "{err}");
    let err = refused_start("listen", &img, &[]);
    assert!(err.contains(&format!("pid {}", l.pid())), "{err}");
}

/// Expected: read-only servers share an image (two `serve --read-only` run
/// side by side and both serve it), and a read-write `serve` of it is then
/// refused, naming a shared lock.
#[test]
fn read_only_servers_share_an_image_and_keep_writers_out() {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let a = Serve::tcp(&img).arg("--read-only").start();
    let b = Serve::tcp(&img).arg("--read-only").start();
    for s in [&a, &b] {
        let mut c = Raw::simple(s.addr());
        assert_bytes_eq(
            &c.read(1, 4096, 512),
            &read_file_at(&img, 4096, 512),
            "read-only read",
        );
        c.req(CMD_DISC, 0, 2, 0, 0);
    }
    let err = refused_start("serve", &img, &[]);
    assert!(err.contains("does not let others write it"), "{err}");
}

/// Expected: the lock is qemu's own, so qemu tools and flexnbd see each
/// other: `qemu-io` cannot open an image `serve` writes to for writing ("write"
/// lock), while a read-only `qemu-io` still reads it; a `serve` of an image
/// `qemu-nbd` serves writable is refused, naming qemu-nbd's pid.
#[test]
fn the_image_lock_is_the_one_qemu_takes() {
    let qemu_io = require_tool("qemu-io");
    let qemu_nbd = require_tool("qemu-nbd");
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let mut srv = Serve::tcp(&img).start();
    let io = |args: &[&str]| run(Command::new(&qemu_io).args(args).arg(&img), TOOL_TIMEOUT);
    let locked = io(&["-f", "raw", "-c", "write 0 4096"]);
    assert_ne!(locked.status.code(), Some(0), "{locked:?}");
    assert!(
        locked.stderr_str().contains("\"write\" lock"),
        "{}",
        locked.stderr_str()
    );
    io(&["-f", "raw", "-r", "-c", "read 0 4096"]).expect_success("read-only qemu-io");
    assert_bytes_eq(
        &read_file(&img),
        &{
            let mut c = Raw::simple(srv.addr());
            let d = c.read(1, 0, MIB as u32);
            c.req(CMD_DISC, 0, 2, 0, 0);
            d
        },
        "image unchanged and served",
    );
    srv.stop();

    let sock = dir.path().join("qemu.sock");
    let mut q = Background::spawn(
        Command::new(&qemu_nbd)
            .args(["-f", "raw", "-k"])
            .arg(&sock)
            .arg(&img),
    );
    assert!(wait_until(Duration::from_secs(20), || sock.exists() || !q.is_running()));
    assert!(q.is_running(), "qemu-nbd: {}", q.stderr());
    let err = refused_start("serve", &img, &[]);
    assert!(err.contains(&format!("pid {}", q.pid())), "{err}");
}
