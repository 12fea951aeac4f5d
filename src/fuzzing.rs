//! Entry points for fuzzing: each takes arbitrary bytes, feeds them to one
//! decoder or state machine that reads input from outside, and must never
//! panic. Used by the `cargo fuzz` targets in `fuzz/` and by the smoke test
//! that replays their corpus in the ordinary test run.
//!
//! Besides "no panic", a few contracts are checked with `assert!` where they
//! are cheap and a break would matter: a validated request lies inside the
//! export and never writes to a read-only one, framing does not depend on how
//! the bytes were split, encoders invert decoders, a reply is one line.
//!
//! The socket surfaces (`server_handshake`, `client_greeting`,
//! `client_replies`) take their first byte as the configuration and the rest
//! as what the peer sends; the others use every byte as input. A socket run
//! never waits for a timeout: the peer's input ends with EOF, and every
//! socket has timeouts as a bound.

use crate::acl::{Acl, AclEntry};
use crate::addr::{parse_ip, parse_port, Endpoint};
use crate::client::{ConnectOptions, Connection};
use crate::control::grammar::{self, escape_value, parse_status, status_json, unescape_value};
use crate::control::server::{Limits, RequestReader};
use crate::control::{Handler, MigrationState, MigrationStatus, MirrorRequest, Reply, Status};
use crate::proto::consts::*;
use crate::proto::handshake::{
    export_name_reply, info_block_size, info_export, newstyle_greeting, oldstyle_greeting,
    option_reply, valid_string, InfoRequest, MetaContextRequest,
};
use crate::proto::reply::{parse_error_payload, truncate_utf8, Framing};
use crate::proto::{
    ClientFlags, Command, Greeting, OptionHeader, OptionReplyHeader, ReplyHeader, Request,
};
use crate::server::handshake::{negotiate, transmission_flags, ExportInfo, Negotiated};
use crate::server::validate::{block_status_payload, validate, Op, MAX_DF_READ, MAX_REQUEST};
use crate::stream::Stream;
use std::io::{self, Read};
use std::net::{IpAddr, Shutdown};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Socket timeouts: a bound, never reached while the peer is there (its
/// input ends with EOF), long enough not to fire on a loaded machine.
const TIMEOUT: Duration = Duration::from_millis(500);
/// The longest a peer thread waits for the other side to close.
const PEER_LIMIT: Duration = Duration::from_secs(5);
/// Most bytes taken from the stream after a successful server handshake.
const MAX_AFTER_HANDSHAKE: u64 = 1 << 20;
/// Most addresses an ACL is asked about per input.
const MAX_PROBES: usize = 64;
/// Export size of the scripted client greetings.
const EXPORT_SIZE: u64 = 1 << 20;

/// The server side of the handshake, as a client's bytes reach it.
///
/// Byte 0: bit 0 read-only, bit 1 shutting down, bit 2 old-style, bits 3-4
/// the export size. After a successful handshake the rest of the stream is
/// decoded as requests and validated against what was negotiated.
pub fn server_handshake(data: &[u8]) {
    let (mode, input) = split_mode(data);
    let info = ExportInfo::local(
        [EXPORT_SIZE, 0, 4097, u64::MAX][usize::from(mode >> 3) & 3],
        mode & 1 != 0,
        mode & 4 != 0,
        1,
    );
    let shutting_down = AtomicBool::new(mode & 2 != 0);
    let (server, client) = UnixStream::pair().expect("fuzz harness: socketpair");
    set_timeouts(&server);
    set_timeouts(&client);
    let conn = Stream::Unix(server);
    thread::scope(|s| {
        let writer = s.spawn(|| {
            send_all(&client, input);
            let _ = client.shutdown(Shutdown::Write);
        });
        let reader = s.spawn(|| drain(&client, None));
        let mut conn = conn;
        if let Ok(neg) = negotiate(
            &mut conn,
            Instant::now() + PEER_LIMIT,
            &info,
            &crate::server::ExportNames::default(),
            None,
            &shutting_down,
        ) {
            assert_eq!(neg.flags, transmission_flags(&info, neg.framing));
            assert!(!neg.base_allocation || neg.structured(), "{neg:?}");
            assert!(!info.oldstyle || !neg.structured(), "{neg:?}");
            let mut rest = Vec::new();
            let _ = (&conn).take(MAX_AFTER_HANDSHAKE).read_to_end(&mut rest);
            requests(&rest, &[neg], &[info.size], &[info.read_only]);
        }
        // Whatever is left, so that the writer finishes before this end closes.
        drain(&conn, None);
        join(writer);
        drop(conn);
        join(reader);
    });
}

/// Transmission-phase request headers: decoded one after another (a bad
/// magic skips a byte, a WRITE skips its payload), each validated against
/// every kind of negotiation, export size and read-only setting.
pub fn request_headers(data: &[u8]) {
    let local = ExportInfo::local(EXPORT_SIZE, false, false, 1);
    let neg = |framing, base_allocation| Negotiated {
        framing,
        base_allocation,
        flags: transmission_flags(&local, framing),
    };
    let negs = [
        neg(Framing::Simple, false),
        neg(Framing::Structured, false),
        neg(Framing::Structured, true),
    ];
    let sizes = [0, 4096, EXPORT_SIZE, 1 << 63, u64::MAX];
    requests(data, &negs, &sizes, &[false, true]);
    let ext = [neg(Framing::Extended, false), neg(Framing::Extended, true)];
    requests(data, &ext, &sizes, &[false, true]);
}

/// `negs` all agree on the header kind (compact or extended).
fn requests(mut rest: &[u8], negs: &[Negotiated], sizes: &[u64], read_only: &[bool]) {
    let extended = negs.first().is_some_and(|n| n.extended());
    let header = if extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    while !rest.is_empty() {
        let req = match Request::decode(rest, extended) {
            Ok(None) => break,
            Err(_) => {
                rest = &rest[1..];
                continue;
            }
            Ok(Some((req, n))) => {
                assert_eq!(n, header);
                rest = &rest[n..];
                req
            }
        };
        let again = match extended {
            true => Request::decode(&req.encode_extended(), true),
            false => Request::decode(&req.encode(), false),
        };
        assert_eq!(again, Ok(Some((req, header))));
        let _ = (req.is_entrust(), req.command.name());
        let payload = usize::try_from(req.payload_len(extended)).unwrap_or(usize::MAX);
        let body = &rest[payload.min(rest.len())..];
        let mut req = req;
        if extended && req.command == Command::BlockStatus && req.flags & CMD_FLAG_PAYLOAD_LEN != 0
        {
            match block_status_payload(&req, &rest[..payload.min(rest.len())]) {
                Ok(r) => {
                    assert_eq!(r.flags & CMD_FLAG_PAYLOAD_LEN, 0);
                    req = r;
                }
                Err(_) => {
                    rest = body;
                    continue;
                }
            }
        }
        for neg in negs {
            for &size in sizes {
                for &ro in read_only {
                    if let Ok(op) = validate(&req, neg, size, ro) {
                        check_valid(&req, op, neg, size, ro);
                    }
                }
            }
        }
        rest = body;
    }
}

/// What a validated request promises the executor.
fn check_valid(req: &Request, op: Op, neg: &Negotiated, size: u64, ro: bool) {
    let end = req.offset.checked_add(req.length);
    match op {
        Op::Disc | Op::Flush => {}
        _ => assert!(end.is_some_and(|e| e <= size), "{req:?} {op:?} size {size}"),
    }
    let modifies = matches!(op, Op::Write { .. } | Op::Trim { .. } | Op::Zero { .. });
    assert!(!(ro && modifies), "{req:?} {op:?} on a read-only export");
    match op {
        Op::Read { df } => {
            assert!(req.length <= MAX_REQUEST);
            assert!(
                !df || (neg.structured() && req.length <= MAX_DF_READ),
                "{req:?}"
            );
        }
        Op::Write { .. } => assert!(req.length <= MAX_REQUEST),
        Op::BlockStatus { .. } => assert!(neg.base_allocation && req.length > 0),
        _ => {}
    }
}

/// The control socket: framing (in several splits and limits, which must
/// agree), the grammar and a reply for each request, and the status and
/// reply-line parsers on the bytes as text.
pub fn control_request(data: &[u8]) {
    let small = Limits {
        max_line: 64,
        max_lines: 8,
        max_request: 300,
        ..Limits::default()
    };
    for limits in [Limits::default(), small] {
        let whole = frame(data, limits, data.len().max(1));
        for chunk in [1, 3, 64] {
            let split = frame(data, limits, chunk);
            assert_eq!(
                whole.is_ok(),
                split.is_ok(),
                "chunk {chunk}: {whole:?} {split:?}"
            );
            if let (Ok(a), Ok(b)) = (&whole, &split) {
                assert_eq!(a, b, "chunk {chunk}");
            }
        }
        let Ok(lines) = whole else { continue };
        assert!(lines.len() <= limits.max_lines);
        for l in &lines {
            assert!(!l.is_empty() && l.len() <= limits.max_line && !l.contains('\n'));
        }
        let reply = grammar::handle(&lines, &FakeDaemon);
        let line = reply.to_line();
        assert!(
            line.ends_with('\n') && line.matches('\n').count() == 1,
            "{line:?}"
        );
        let back = Reply::parse_line(&line).expect("a reply line parses");
        assert_eq!(back.code, reply.code);
        if let Ok(grammar::Command::Status) = grammar::parse(&lines) {
            grammar::status_text_to_json(&back.text).expect("the status reply parses");
        }
    }
    let text = String::from_utf8_lossy(data);
    let _ = Reply::parse_line(&text);
    if let Ok(pairs) = parse_status(&text) {
        let _ = status_json(&pairs).to_string();
    }
    let _ = unescape_value(&text);
    let escaped = escape_value(&text);
    assert!(!escaped.contains(char::is_whitespace), "{escaped:?}");
    assert_eq!(unescape_value(&escaped), text);
}

fn frame(data: &[u8], limits: Limits, chunk: usize) -> Result<Vec<String>, ()> {
    let mut r = RequestReader::new(limits);
    for piece in data.chunks(chunk) {
        match r.push(piece) {
            Ok(Some(lines)) => return Ok(lines),
            Ok(None) => {}
            Err(_) => return Err(()),
        }
    }
    r.finish().map_err(|_| ())
}

/// A daemon that answers every control command without doing anything.
struct FakeDaemon;

impl Handler for FakeDaemon {
    fn status(&self) -> Status {
        Status {
            pid: 1,
            size: EXPORT_SIZE,
            is_mirroring: true,
            clients_allowed: true,
            num_clients: 2,
            has_control: true,
            pause: None,
            proxy: None,
            tls: None,
            migration: Some(MigrationStatus {
                speed: 1000,
                duration: 3,
                seconds_left: Some(4),
                bytes_left: 4096,
                speed_limit: Some(1 << 20),
                attempts: 2,
                state: MigrationState::Retrying,
                retry_in: Some(1),
                last_error: Some("connect: 100% failed\n\t at 1.2.3.4".into()),
            }),
        }
    }
    fn set_acl(&self, _entries: Vec<AclEntry>) {}
    fn start_mirror(&self, req: MirrorRequest) -> Reply {
        Reply::ok(format!("Mirror started {req:?}"))
    }
    fn set_mirror_speed(&self, bytes_per_sec: u64) -> Reply {
        Reply::ok(format!("limit {bytes_per_sec}"))
    }
    fn break_mirror(&self) -> Reply {
        Reply::err(1, "not mirroring")
    }
}

/// The client side of the handshake (what `mirror`, `read` and `write` do
/// first), with the bytes as everything the server sends.
///
/// Byte 0: bit 0 asks for structured replies, bit 1 for a named export.
pub fn client_greeting(data: &[u8]) {
    let (mode, input) = split_mode(data);
    let opts = ConnectOptions {
        structured_replies: mode & 1 != 0,
        export_name: if mode & 2 != 0 {
            "fuzz".into()
        } else {
            String::new()
        },
        ..client_options()
    };
    with_fake_server(input, &opts, |c| {
        let _ = (c.size(), c.flags(), c.info().read_only());
        let _ = c.disconnect();
    });
}

/// The client's reading of transmission-phase replies: a scripted valid
/// greeting, then the bytes as the replies to a fixed series of requests.
///
/// Byte 0, bits 0-1: old-style; newstyle with NBD_OPT_GO; the same with
/// structured replies; plain newstyle with NBD_OPT_EXPORT_NAME. Bit 2: the
/// requests are pipelined (WRITE, WRITE_ZEROES, TRIM, FLUSH, ENTRUST with
/// cookies 1-5) instead of blocking (READ 512 bytes at 4096, READ 2048 at 0
/// streamed, WRITE 512 at 8192 with FUA, WRITE_ZEROES, TRIM, FLUSH: cookies
/// 1-6).
pub fn client_replies(data: &[u8]) {
    let (mode, input) = split_mode(data);
    let style = mode & 3;
    let structured = style == 2;
    let export = ExportInfo::local(EXPORT_SIZE, false, style == 0, 1);
    let framing = match structured {
        true => Framing::Structured,
        false => Framing::Simple,
    };
    let flags = transmission_flags(&export, framing);
    let mut script = match style {
        0 => oldstyle_greeting(EXPORT_SIZE, u32::from(flags)).to_vec(),
        3 => newstyle_greeting(0).to_vec(),
        _ => newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_vec(),
    };
    if structured {
        script.extend(option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        let ctx = crate::proto::handshake::rep_meta_context(1, "base:allocation");
        script.extend(option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx));
        script.extend(option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
    }
    match style {
        1 | 2 => {
            script.extend(option_reply(
                OPT_GO,
                REP_INFO,
                &info_export(EXPORT_SIZE, flags),
            ));
            let bs = info_block_size(1, 4096, 32 << 20);
            script.extend(option_reply(OPT_GO, REP_INFO, &bs));
            script.extend(option_reply(OPT_GO, REP_ACK, &[]));
        }
        3 => script.extend(export_name_reply(EXPORT_SIZE, flags, false)),
        _ => {}
    }
    script.extend_from_slice(input);
    let opts = ConnectOptions {
        structured_replies: structured,
        base_allocation: structured,
        ..client_options()
    };
    let pipelined = mode & 4 != 0;
    with_fake_server(&script, &opts, |mut c| {
        if pipelined {
            pipeline(c);
            return;
        }
        let mut buf = [0u8; 512];
        let _ = c.read_into(4096, &mut buf);
        let mut out = Vec::new();
        let _ = c.read_to(0, 2048, &mut out);
        assert!(out.len() <= 2048);
        let _ = c.write(8192, &[0x5a; 512], true);
        let _ = c.write_zeroes(0, 4096, false);
        let _ = c.trim(4096, 4096);
        let _ = c.flush();
        let _ = c.disconnect();
    });
}

fn pipeline(c: Connection) {
    let Ok((mut tx, mut rx)) = c.into_pipeline(TIMEOUT) else {
        return;
    };
    let _ = tx.write(1, 0, &[1; 512], false);
    let _ = tx.write_zeroes(2, 4096, 8192, true);
    let _ = tx.trim(3, 0, 4096);
    let _ = tx.flush(4);
    let _ = tx.entrust(5);
    // What the proxy forwards: reads (their data comes with the completion)
    // and block status (descriptors of the selected context).
    let _ = tx.read(6, 0, 4096);
    let _ = tx.queue(Request::new(Command::BlockStatus, 0, 7, 0, 65536), &[]);
    let _ = tx.send_queued();
    for _ in 0..8 {
        if rx.in_flight() == 0 || !matches!(rx.recv(), Ok(Some(_))) {
            break;
        }
    }
    let _ = tx.disconnect();
    let _ = rx.recv();
}

fn client_options() -> ConnectOptions {
    ConnectOptions {
        connect_timeout: TIMEOUT,
        greeting_timeout: TIMEOUT,
        request_timeout: Some(TIMEOUT),
        ..ConnectOptions::default()
    }
}

/// Runs `client` on a connection to a fake server that sends `script`,
/// ends its side of the stream and takes in whatever the client sends until
/// the client closes. The client connects through a unix socket path: its
/// socket type is private to `client`, so a socket pair cannot be handed in.
fn with_fake_server(script: &[u8], opts: &ConnectOptions, client: impl FnOnce(Connection)) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("flexnbd-fuzz-{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("fuzz harness: bind a unix socket");
    let accepted = AtomicBool::new(false);
    thread::scope(|s| {
        let server = s.spawn(|| {
            let Ok((peer, _)) = listener.accept() else {
                return;
            };
            accepted.store(true, Ordering::Release);
            set_timeouts(&peer);
            send_all(&peer, script);
            let _ = peer.shutdown(Shutdown::Write);
            drain(&peer, Some(Instant::now() + PEER_LIMIT));
        });
        let endpoint = Endpoint::Unix(path.clone());
        if let Ok(c) = Connection::connect(&endpoint, opts) {
            client(c);
        }
        if !accepted.load(Ordering::Acquire) {
            // The client never got as far as connecting: free the accept.
            let _ = UnixStream::connect(&path);
        }
        join(server);
    });
    let _ = std::fs::remove_file(&path);
}

/// Joins a harness thread, passing its panic on. Joining explicitly (rather
/// than leaving it to the scope) waits until the thread has exited, thread
/// locals freed, so LeakSanitizer does not see them as leaks.
fn join(h: thread::ScopedJoinHandle<'_, ()>) {
    if let Err(panic) = h.join() {
        std::panic::resume_unwind(panic);
    }
}

/// ACL entries and lists, IP addresses, ports and endpoints, one per line.
pub fn acl_and_addresses(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.split('\n').collect();
    let mut ips: Vec<IpAddr> = vec![
        [127, 0, 0, 1].into(),
        [10, 1, 2, 3].into(),
        "::1".parse().unwrap(),
    ];
    for (i, line) in lines.iter().enumerate() {
        if ips.len() >= MAX_PROBES {
            ips.truncate(MAX_PROBES);
        }
        if let Ok(e) = AclEntry::parse(line) {
            assert_eq!(AclEntry::parse(&e.to_string()), Ok(e), "{line:?}");
            assert!(e.matches(e.ip), "{e}");
            ips.push(e.ip);
        }
        if let Ok(ip) = parse_ip(line) {
            ips.push(ip);
        }
        let port = parse_port(line);
        if let Ok(p) = port {
            assert_eq!(p.to_string().parse::<u16>(), Ok(p));
        }
        for port in [lines.get(i + 1).copied(), None] {
            match Endpoint::from_addr_port(line, port) {
                Ok(Endpoint::Tcp(a)) => assert_eq!(parse_ip(line), Ok(a.ip()), "{line:?}"),
                Ok(e @ Endpoint::Unix(_)) => {
                    assert!(line.contains('/') && !e.to_string().is_empty())
                }
                Err(_) => {}
            }
        }
    }
    let entries: Vec<&str> = lines.iter().copied().filter(|l| !l.is_empty()).collect();
    for deny in [false, true] {
        for list in [&lines, &entries] {
            let Ok(acl) = Acl::parse(list.as_slice(), deny) else {
                continue;
            };
            for &ip in &ips {
                let allowed = acl.allows(ip);
                if acl
                    .entries
                    .iter()
                    .any(|e| e.ip == crate::addr::canonical_ip(ip))
                {
                    assert!(allowed, "{ip} is in {acl:?}");
                }
            }
        }
    }
}

/// The handshake and reply decoders of `proto` on their own, without sockets
/// (fast): greetings, option headers and replies, client flags, reply headers,
/// NBD_OPT_GO and meta context data (which must re-encode to the same bytes),
/// error chunk payloads and strings.
pub fn proto_messages(data: &[u8]) {
    for at in 0..data.len().min(4) {
        let b = &data[at..];
        let consumed = [
            Greeting::decode(b).ok().flatten().map(|(_, n)| n),
            OptionHeader::decode(b).ok().flatten().map(|(_, n)| n),
            OptionReplyHeader::decode(b).ok().flatten().map(|(_, n)| n),
            ClientFlags::decode(b, FLAG_FIXED_NEWSTYLE)
                .ok()
                .flatten()
                .map(|(_, n)| n),
            ClientFlags::decode(b, FLAG_NO_ZEROES)
                .ok()
                .flatten()
                .map(|(_, n)| n),
            ReplyHeader::decode(b).ok().flatten().map(|(_, n)| n),
        ];
        for n in consumed.into_iter().flatten() {
            assert!(n > 0 && n <= b.len());
        }
        if let Ok(r) = InfoRequest::parse(b) {
            assert_eq!(r.encode(), b);
        }
        if let Ok(r) = MetaContextRequest::parse(b) {
            assert_eq!(r.encode(), b);
        }
        if let Ok((_, msg)) = parse_error_payload(b) {
            assert!(msg.len() <= 3 * b.len());
        }
        if let Some(s) = valid_string(b) {
            for max in [0, 1, 5, s.len() / 2] {
                assert!(truncate_utf8(s, max).len() <= max);
            }
        }
    }
}

/// The first byte as a configuration, the rest as the stream.
fn split_mode(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&m, rest)) => (m, rest),
        None => (0, data),
    }
}

fn set_timeouts(s: &UnixStream) {
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let _ = s.set_write_timeout(Some(TIMEOUT));
}

/// Writes `buf` without risking SIGPIPE; stops at the first error.
fn send_all(s: &UnixStream, mut buf: &[u8]) {
    let sock = socket2::SockRef::from(s);
    while !buf.is_empty() {
        match sock.send_with_flags(buf, libc::MSG_NOSIGNAL) {
            Ok(0) => return,
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Reads and drops what arrives until EOF, an error, or `until` (a timeout
/// before it is waited through).
fn drain(mut s: impl Read, until: Option<Instant>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) && until.is_some_and(|u| Instant::now() < u) => {}
            Err(_) => return,
        }
    }
}
