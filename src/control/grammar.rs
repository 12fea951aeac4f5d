//! Control command grammar: request lines to commands, commands to replies, and the
//! text and JSON forms of the status line. Pure: no I/O, no clock, no logging.
//! (The `CODE: text` reply line itself is [`Reply::to_line`] / [`Reply::parse_line`].)
//!
//! Argument rules beyond the original C server:
//! - `mirror` takes an optional sixth line, RETRIES (failed attempts tolerated,
//!   or `forever`), and a seventh, `wait`: the reply `0: Mirror started` is
//!   then followed, on the same connection, by a second line with the outcome
//!   (as `mirror_wait` gives), sent before the server exits at a hand-over.
//!   After those, `tls` migrates over TLS, optionally followed by
//!   `tls-certificates=DIR` and `tls-hostname=NAME`; `export-name=NAME`
//!   (anywhere among those) is the export asked of the destination.
//! - An empty line cannot be an argument (it ends the request), so "no bind address"
//!   is spelled as an unspecified address (`0`, `0.0.0.0`, `::`) in the BIND position.
//! - A MAX_BPS of `0` in `mirror` means "no limit". `mirror_max_bps` passes its value
//!   through unchanged (the daemon reads `0` as "remove the limit").
//! - Numbers are plain decimal digits; anything else is an error, not a silent zero.
//! - Arguments are checked before the daemon is asked anything, so `mirror_max_bps`
//!   with a bad argument reports the argument even when no migration is running.

use super::{Handler, MirrorAction, MirrorRequest, MirrorTls, PauseRequest, Reply, Status};
use crate::acl::AclEntry;
use crate::addr::{parse_ip, parse_port};
use serde_json::{Map, Number, Value};
use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// Reply code of an empty request.
pub const CODE_MISSING_COMMAND: u32 = 9;
/// Reply code of a request whose first line is no known command.
pub const CODE_UNKNOWN_COMMAND: u32 = 10;

/// A parsed, validated control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Status,
    /// Replace the ACL with these entries (possibly none).
    Acl(Vec<AclEntry>),
    Mirror(MirrorRequest),
    /// Change the speed limit of the running migration (bytes per second).
    MirrorMaxBps(u64),
    Break,
    /// Wait until the running migration ends (used by `mirror --wait`).
    MirrorWait,
    /// `pause [SECONDS [hold]]`.
    Pause(PauseRequest),
    /// `resume [ID]`: end that pause, or every pause.
    Resume(Option<u64>),
}

/// Why a request was refused before reaching the daemon; `Display` is the reply text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("missing command")]
    MissingCommand,
    #[error("unknown command")]
    UnknownCommand,
    #[error("bad spec: {0}")]
    BadAclSpec(String),
    #[error("mirror takes at least two parameters")]
    MirrorTooFewParameters,
    #[error("bad IP address")]
    BadIp,
    #[error("bad IP port number")]
    BadPort,
    #[error("action must be 'exit', 'unlink' or 'nothing'")]
    BadAction,
    #[error("bad bind address")]
    BadBind,
    #[error("max_bps out of range")]
    MaxBpsOutOfRange,
    #[error("max_bps couldn't be parsed")]
    MaxBpsUnparsable,
    #[error("retries out of range")]
    RetriesOutOfRange,
    #[error("retries couldn't be parsed")]
    RetriesUnparsable,
    #[error("unrecognised parameters to mirror")]
    MirrorTooManyParameters,
    #[error(
        "mirror TLS lines: tls, then at most one tls-certificates=DIR and one tls-hostname=NAME"
    )]
    BadMirrorTls,
    #[error("mirror: at most one export-name=NAME line")]
    BadMirrorExportName,
    #[error("mirror_max_bps takes exactly one parameter")]
    MaxBpsParameterCount,
    #[error("{0} takes no parameters")]
    NoParameters(&'static str),
    #[error("pause: the timeout must be a number of seconds above 0 and at most 86400")]
    BadPauseTimeout,
    #[error("pause takes at most a timeout and 'hold'")]
    PauseParameters,
    #[error("resume takes at most the id of a pause")]
    ResumeParameters,
}

impl CommandError {
    /// The reply code: 9 and 10 as in the C server, 1 for every argument error.
    pub fn code(&self) -> u32 {
        match self {
            CommandError::MissingCommand => CODE_MISSING_COMMAND,
            CommandError::UnknownCommand => CODE_UNKNOWN_COMMAND,
            _ => 1,
        }
    }

    pub fn to_reply(&self) -> Reply {
        Reply::err(self.code(), self.to_string())
    }
}

/// Parses a request (its lines, without the terminating empty line).
pub fn parse<S: AsRef<str>>(lines: &[S]) -> Result<Command, CommandError> {
    let Some((cmd, args)) = lines.split_first() else {
        return Err(CommandError::MissingCommand);
    };
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    match cmd.as_ref() {
        "" => Err(CommandError::MissingCommand),
        "status" => Ok(Command::Status),
        "acl" => args
            .iter()
            .map(|a| AclEntry::parse(a).map_err(|e| CommandError::BadAclSpec(e.0)))
            .collect::<Result<Vec<_>, _>>()
            .map(Command::Acl),
        "mirror" => parse_mirror(&args).map(Command::Mirror),
        "mirror_max_bps" => match args.as_slice() {
            [n] => max_bps(n).map(Command::MirrorMaxBps),
            _ => Err(CommandError::MaxBpsParameterCount),
        },
        "break" => match args.as_slice() {
            [] => Ok(Command::Break),
            _ => Err(CommandError::NoParameters("break")),
        },
        "mirror_wait" => match args.as_slice() {
            [] => Ok(Command::MirrorWait),
            _ => Err(CommandError::NoParameters("mirror_wait")),
        },
        "pause" => parse_pause(&args).map(Command::Pause),
        "resume" => match args.as_slice() {
            [] => Ok(Command::Resume(None)),
            [id] => decimal(
                id,
                CommandError::ResumeParameters,
                CommandError::ResumeParameters,
            )
            .map(|n| Command::Resume(Some(n))),
            _ => Err(CommandError::ResumeParameters),
        },
        _ => Err(CommandError::UnknownCommand),
    }
}

/// `mirror` arguments: ADDR PORT [ACTION [BIND [MAX_BPS [RETRIES [wait]]]]],
/// checked in the order the C server checks them (the count of extra lines
/// last). RETRIES is a number or `forever`; `wait` asks for a second reply
/// line with the outcome.
fn parse_mirror(all: &[&str]) -> Result<MirrorRequest, CommandError> {
    // Option lines (`tls`, `tls-certificates=DIR`, `tls-hostname=NAME`,
    // `export-name=NAME`) may follow the positional ones.
    let (args, opt_lines): (Vec<&str>, Vec<&str>) = match all.iter().position(|a| is_option_line(a))
    {
        Some(i) if i >= 2 => (all[..i].to_vec(), all[i..].to_vec()),
        _ => (all.to_vec(), Vec::new()),
    };
    let (names, tls_lines): (Vec<&str>, Vec<&str>) = opt_lines
        .iter()
        .partition(|l| l.starts_with("export-name="));
    let export_name = match names.as_slice() {
        [] => String::new(),
        [n] => n["export-name=".len()..].to_owned(),
        _ => return Err(CommandError::BadMirrorExportName),
    };
    let tls = parse_mirror_tls(&tls_lines)?;
    let args = args.as_slice();
    if args.len() < 2 {
        return Err(CommandError::MirrorTooFewParameters);
    }
    let ip = parse_ip(args[0]).map_err(|_| CommandError::BadIp)?;
    let port = parse_port(args[1]).map_err(|_| CommandError::BadPort)?;
    let action = match args.get(2).copied() {
        None | Some("exit") => MirrorAction::Exit,
        Some("unlink") => MirrorAction::Unlink,
        Some("nothing") => MirrorAction::Nothing,
        Some(_) => return Err(CommandError::BadAction),
    };
    let bind = match args.get(3) {
        Some(b) => Some(parse_ip(b).map_err(|_| CommandError::BadBind)?),
        None => None,
    };
    let max_bps = args.get(4).map(|n| max_bps(n)).transpose()?;
    let retries = match args.get(5).copied() {
        None | Some("forever") => None,
        Some(n) => {
            use CommandError::{RetriesOutOfRange, RetriesUnparsable};
            Some(decimal(n, RetriesOutOfRange, RetriesUnparsable)?)
        }
    };
    let wait = match args.get(6).copied() {
        None => false,
        Some("wait") => true,
        Some(_) => return Err(CommandError::MirrorTooManyParameters),
    };
    if args.len() > 7 {
        return Err(CommandError::MirrorTooManyParameters);
    }
    Ok(MirrorRequest {
        dest: SocketAddr::new(ip, port),
        action,
        bind: bind.filter(|ip| !ip.is_unspecified()),
        max_bps: max_bps.filter(|n| *n != 0),
        retries,
        wait,
        tls,
        export_name,
    })
}

fn is_option_line(a: &str) -> bool {
    a == "tls"
        || a.starts_with("tls-certificates=")
        || a.starts_with("tls-hostname=")
        || a.starts_with("export-name=")
}

/// The TLS lines of `mirror`: `tls` turns TLS on, the others refine it.
fn parse_mirror_tls(lines: &[&str]) -> Result<Option<MirrorTls>, CommandError> {
    let mut t = MirrorTls::default();
    let mut on = false;
    for l in lines {
        if *l == "tls" && !on {
            on = true;
        } else if let Some(d) = l.strip_prefix("tls-certificates=") {
            if d.is_empty() || t.certificates.is_some() {
                return Err(CommandError::BadMirrorTls);
            }
            t.certificates = Some(d.into());
        } else if let Some(h) = l.strip_prefix("tls-hostname=") {
            if h.is_empty() || t.hostname.is_some() {
                return Err(CommandError::BadMirrorTls);
            }
            t.hostname = Some(h.into());
        } else {
            return Err(CommandError::BadMirrorTls);
        }
    }
    match (on, lines.is_empty()) {
        (true, _) => Ok(Some(t)),
        (false, true) => Ok(None),
        (false, false) => Err(CommandError::BadMirrorTls),
    }
}

/// The default lease of a pause.
pub const PAUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `pause` arguments: [SECONDS [hold]] (fractions of a second allowed).
fn parse_pause(args: &[&str]) -> Result<PauseRequest, CommandError> {
    let timeout = match args.first() {
        None => PAUSE_TIMEOUT,
        Some(t) => {
            let ok = !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.');
            match t.parse::<f64>() {
                Ok(v) if ok && v > 0.0 && v <= 86_400.0 => std::time::Duration::from_secs_f64(v),
                _ => return Err(CommandError::BadPauseTimeout),
            }
        }
    };
    let hold = match args.get(1).copied() {
        None => false,
        Some("hold") => true,
        Some(_) => return Err(CommandError::PauseParameters),
    };
    if args.len() > 2 {
        return Err(CommandError::PauseParameters);
    }
    Ok(PauseRequest { timeout, hold })
}

fn max_bps(s: &str) -> Result<u64, CommandError> {
    decimal(
        s,
        CommandError::MaxBpsOutOfRange,
        CommandError::MaxBpsUnparsable,
    )
}

/// A plain decimal number: `syntax` if it is not one, `range` if it is too large.
fn decimal<T: FromStr>(
    s: &str,
    range: CommandError,
    syntax: CommandError,
) -> Result<T, CommandError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(syntax);
    }
    s.parse().map_err(|_| range)
}

/// Parses and runs a request; always exactly one reply.
pub fn handle(lines: &[String], h: &dyn Handler) -> Reply {
    match parse(lines) {
        Ok(cmd) => run(cmd, h),
        Err(e) => e.to_reply(),
    }
}

/// Runs a parsed command against the daemon.
pub fn run(cmd: Command, h: &dyn Handler) -> Reply {
    match cmd {
        Command::Status => Reply::ok(format_status(&h.status())),
        Command::Acl(entries) => {
            h.set_acl(entries);
            Reply::ok("updated")
        }
        Command::Mirror(req) => h.start_mirror(req),
        Command::MirrorMaxBps(n) => h.set_mirror_speed(n),
        Command::Break => h.break_mirror(),
        Command::MirrorWait => h.wait_mirror(),
        // A held pause ends with the request here; the control server keeps
        // the lease for as long as the connection (see `control::server`).
        Command::Pause(req) => match h.pause(req) {
            Ok(p) => p.reply,
            Err(r) => r,
        },
        Command::Resume(id) => h.resume(id),
    }
}

/// The `status` pairs in wire order.
pub fn status_pairs(s: &Status) -> Vec<(Cow<'static, str>, String)> {
    let mut v = vec![
        ("pid", s.pid.to_string()),
        ("size", s.size.to_string()),
        ("is_mirroring", s.is_mirroring.to_string()),
        ("clients_allowed", s.clients_allowed.to_string()),
        ("num_clients", s.num_clients.to_string()),
        ("has_control", s.has_control.to_string()),
        ("paused", s.pause.is_some().to_string()),
    ];
    if let Some(p) = &s.pause {
        v.push(("paused_for", format!("{:.3}", p.paused_for.as_secs_f64())));
        v.push(("pause_holds", p.holds.to_string()));
        v.push(("queued_requests", p.queued_requests.to_string()));
    }
    if let Some(t) = &s.tls {
        v.push(("tls", t.mode.to_string()));
        v.push(("tls_verify_peer", t.verify_peer.to_string()));
        let on = t.clients.iter().filter(|(_, c)| c.is_some()).count();
        v.push(("tls_clients", on.to_string()));
    }
    let mut v: Vec<(Cow<'static, str>, String)> =
        v.into_iter().map(|(k, x)| (Cow::Borrowed(k), x)).collect();
    for (id, c) in s.tls.iter().flat_map(|t| &t.clients) {
        let version = c.as_ref().map_or("none", |(v, _)| v.as_str());
        v.push((format!("client_{id}_tls").into(), version.to_owned()));
        if let Some((_, Some(subject))) = c {
            v.push((format!("client_{id}_subject").into(), escape_value(subject)));
        }
    }
    let mut push = |k: &'static str, x: String| v.push((Cow::Borrowed(k), x));
    if let Some(p) = &s.proxy {
        push("upstream_address", escape_value(&p.upstream_address));
        push("upstream", p.upstream.to_string());
        push("upstream_attempts", p.attempts.to_string());
        push("requests_resent", p.requests_resent.to_string());
        push("in_flight", p.in_flight.to_string());
        if let Some(e) = &p.last_error {
            push("upstream_last_error", escape_value(e));
        }
    }
    if let Some(m) = &s.migration {
        push("migration_speed", m.speed.to_string());
        push("migration_duration", m.duration.to_string());
        if let Some(secs) = m.seconds_left {
            push("migration_seconds_left", secs.to_string());
        }
        push("migration_bytes_left", m.bytes_left.to_string());
        if let Some(limit) = m.speed_limit {
            push("migration_speed_limit", limit.to_string());
        }
        push("migration_attempts", m.attempts.to_string());
        push("migration_state", m.state.as_str().to_string());
        if let Some(secs) = m.retry_in {
            push("migration_retry_in", secs.to_string());
        }
        if let Some(e) = &m.last_error {
            push("migration_last_error", escape_value(e));
        }
    }
    v
}

/// A free-text status value (`migration_last_error`) without spaces: `%`,
/// whitespace and control characters become `%XX` (their UTF-8 bytes).
pub fn escape_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '%' || c.is_whitespace() || c.is_control() {
            let mut b = [0u8; 4];
            for byte in c.encode_utf8(&mut b).bytes() {
                out.push_str(&format!("%{byte:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Undoes [`escape_value`]; a `%` not followed by two hex digits stays as it is.
pub fn unescape_value(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |x: u8| (x as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|&x| hex(x)),
            b.get(i + 2).and_then(|&x| hex(x)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Status keys whose values are escaped free text.
const ESCAPED_KEYS: [&str; 3] = [
    "migration_last_error",
    "upstream_address",
    "upstream_last_error",
];

/// The `status` reply text: `key=value` pairs separated by single spaces.
pub fn format_status(s: &Status) -> String {
    s.to_string()
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in status_pairs(self).iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// A status text that is not a list of `key=value` pairs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad status field: {0:?}")]
pub struct StatusParseError(pub String);

/// Splits a status text into its `(key, value)` pairs, in order. Any run of
/// whitespace separates pairs; a key must not be empty, a value may be.
pub fn parse_status(text: &str) -> Result<Vec<(String, String)>, StatusParseError> {
    text.split_ascii_whitespace()
        .map(|field| match field.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(StatusParseError(field.to_owned())),
        })
        .collect()
}

/// The pairs as one JSON object in the same order: numbers as numbers, `true` and
/// `false` as booleans, anything else as strings. A repeated key keeps its first
/// position and its last value.
pub fn status_json(pairs: &[(String, String)]) -> Value {
    let mut map = Map::new();
    for (k, v) in pairs {
        let escaped = ESCAPED_KEYS.contains(&k.as_str())
            || (k.starts_with("client_") && k.ends_with("_subject"));
        let value = match escaped {
            true => Value::String(unescape_value(v)),
            false => json_scalar(v),
        };
        map.insert(k.clone(), value);
    }
    Value::Object(map)
}

/// [`parse_status`] then [`status_json`].
pub fn status_text_to_json(text: &str) -> Result<Value, StatusParseError> {
    parse_status(text).map(|p| status_json(&p))
}

fn json_scalar(v: &str) -> Value {
    match v {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        _ => {}
    }
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let integer = match v.strip_prefix('-') {
        Some(rest) => digits(rest).then(|| v.parse::<i64>().ok().map(Number::from)),
        None => digits(v).then(|| v.parse::<u64>().ok().map(Number::from)),
    };
    let number = match integer {
        // An integer too large for 64 bits stays an exact string.
        Some(n) => n,
        None => {
            let numeric = v.bytes().any(|b| b.is_ascii_digit())
                && v.bytes()
                    .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
            numeric
                .then(|| v.parse::<f64>().ok().and_then(Number::from_f64))
                .flatten()
        }
    };
    number.map_or_else(|| Value::String(v.to_owned()), Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::MigrationStatus;
    use proptest::prelude::*;
    use std::sync::Mutex;

    /// Records the last call that changes something.
    #[derive(Default)]
    struct Fake(Mutex<Option<String>>, Option<MigrationStatus>);

    impl Handler for Fake {
        fn status(&self) -> Status {
            Status {
                pid: 42,
                size: 1 << 20,
                is_mirroring: self.1.is_some(),
                clients_allowed: true,
                num_clients: 3,
                has_control: true,
                migration: self.1.clone(),
                pause: None,
                proxy: None,
                tls: None,
            }
        }
        fn set_acl(&self, entries: Vec<AclEntry>) {
            *self.0.lock().unwrap() = Some(format!("acl {entries:?}"));
        }
        fn start_mirror(&self, req: MirrorRequest) -> Reply {
            *self.0.lock().unwrap() = Some(format!("mirror {req:?}"));
            Reply::ok("Mirror started")
        }
        fn set_mirror_speed(&self, bps: u64) -> Reply {
            *self.0.lock().unwrap() = Some(format!("speed {bps}"));
            Reply::ok("updated")
        }
        fn break_mirror(&self) -> Reply {
            Reply::err(1, "not mirroring\nsecond line")
        }
    }

    /// A request as `|`-separated lines.
    fn split(s: &str) -> Vec<String> {
        s.split('|')
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    fn reply(req: &str) -> String {
        handle(&split(req), &Fake::default()).to_line()
    }

    fn last_call(req: &str) -> Option<String> {
        let fake = Fake::default();
        handle(&split(req), &fake);
        fake.0.into_inner().unwrap()
    }

    fn mirror(args: &str) -> Result<MirrorRequest, CommandError> {
        match parse(&split(&format!("mirror|{args}")))? {
            Command::Mirror(r) => Ok(r),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn status_line() {
        let base = "pid=42 size=1048576 is_mirroring=false clients_allowed=true num_clients=3 \
                    has_control=true paused=false";
        assert_eq!(reply("status|ignored"), format!("0: {base}\n"));
        let mut m = MigrationStatus {
            speed: 100,
            duration: 7,
            seconds_left: Some(3),
            bytes_left: 300,
            speed_limit: None,
            attempts: 2,
            state: crate::control::MigrationState::Copying,
            retry_in: None,
            last_error: None,
        };
        let tail = "migration_speed=100 migration_duration=7 migration_seconds_left=3 \
                    migration_bytes_left=300";
        let fake = Fake(Mutex::default(), Some(m.clone()));
        let s = format_status(&fake.status());
        let want = format!("{tail} migration_attempts=2 migration_state=copying");
        assert!(s.ends_with(&want), "{s}");
        m.speed_limit = Some(50);
        let s = format_status(&Fake(Mutex::default(), Some(m.clone())).status());
        let want = format!("{tail} migration_speed_limit=50 migration_attempts=2");
        assert!(s.contains(&want) && s.contains("is_mirroring=true"), "{s}");
        // Retrying: no ETA, the wait and the reason (escaped, no spaces).
        m.seconds_left = None;
        m.state = crate::control::MigrationState::Retrying;
        m.retry_in = Some(4);
        m.last_error = Some("no reply within 60s (100% sure)".into());
        let s = format_status(&Fake(Mutex::default(), Some(m)).status());
        assert!(!s.contains("seconds_left"), "{s}");
        let want = "migration_state=retrying migration_retry_in=4 \
                    migration_last_error=no%20reply%20within%2060s%20(100%25%20sure)";
        assert!(s.ends_with(want), "{s}");
        let json = status_text_to_json(&s).unwrap();
        assert_eq!(
            json["migration_last_error"],
            "no reply within 60s (100% sure)"
        );
        assert_eq!(json["migration_retry_in"], 4);
    }

    #[test]
    fn status_json_keeps_order_and_types() {
        let text = "pid=42 is_mirroring=false name=x neg=-3 f=1.5 e= big=99999999999999999999";
        let json = status_text_to_json(text).unwrap().to_string();
        let want = r#"{"pid":42,"is_mirroring":false,"name":"x","neg":-3,"f":1.5,"e":"","#;
        assert_eq!(json, format!(r#"{want}"big":"99999999999999999999"}}"#));
        let json = status_text_to_json("  b=1\t a=true \n")
            .unwrap()
            .to_string();
        assert_eq!(json, r#"{"b":1,"a":true}"#);
        for bad in ["novalue", "=v", "a=1 b"] {
            assert!(parse_status(bad).is_err(), "{bad}");
        }
        for s in ["inf", "NaN", "1.2.3", "-", "+", "e", "0x10"] {
            assert_eq!(json_scalar(s), Value::String(s.into()), "{s}");
        }
    }

    #[test]
    fn acl() {
        let call = last_call("acl|127.0.0.1|10.0.0.0/8").unwrap();
        assert!(
            call.contains("prefix: 32") && call.contains("prefix: 8"),
            "{call}"
        );
        assert_eq!(reply("acl|127.0.0.1|nope|x"), "1: bad spec: nope\n");
        assert_eq!(last_call("acl|127.0.0.1|nope"), None, "old list kept");
        assert_eq!(last_call("acl").as_deref(), Some("acl []"));
    }

    /// Replies whose exact text scripts may depend on.
    #[test]
    fn reply_texts() {
        let m = "mirror|1.2.3.4|1|exit";
        #[rustfmt::skip]
        let table = [
            ("", "9: missing command"),
            ("frobnicate", "10: unknown command"),
            ("STATUS", "10: unknown command"),
            ("break", "1: not mirroring second line"),
            ("break|x", "1: break takes no parameters"),
            ("mirror_wait|x", "1: mirror_wait takes no parameters"),
            ("acl", "0: updated"),
            ("mirror|x", "1: mirror takes at least two parameters"),
            ("mirror|x|1", "1: bad IP address"),
            ("mirror|1.2.3.4|y", "1: bad IP port number"),
            (&format!("{m}|b"), "1: bad bind address"),
            ("mirror|1.2.3.4|1|x", "1: action must be 'exit', 'unlink' or 'nothing'"),
            (&format!("{m}|0|1|2|3"), "1: unrecognised parameters to mirror"),
            (&format!("{m}|0|1|2|wait|4"), "1: unrecognised parameters to mirror"),
            ("mirror|127.0.0.1|9", "0: Mirror started"),
            ("mirror_max_bps|0", "0: updated"),
            ("mirror_max_bps|1k", "1: max_bps couldn't be parsed"),
            ("mirror_max_bps|99999999999999999999", "1: max_bps out of range"),
            ("mirror_max_bps", "1: mirror_max_bps takes exactly one parameter"),
            ("mirror_max_bps|1|2", "1: mirror_max_bps takes exactly one parameter"),
        ];
        for (req, want) in table {
            assert_eq!(reply(req), format!("{want}\n"), "{req:?}");
        }
        let empty_first = handle(&[String::new()], &Fake::default());
        assert_eq!(empty_first, Reply::err(9, "missing command"));
        assert_eq!(last_call("mirror_max_bps|77").as_deref(), Some("speed 77"));
        assert_eq!(last_call("mirror|1.2.3.4|x"), None);
        assert!(last_call("mirror|127.0.0.1|9").is_some());
    }

    #[test]
    fn mirror_tls_lines() {
        assert_eq!(mirror("127.0.0.1|4000").unwrap().tls, None);
        let r = mirror("127.0.0.1|4000|exit|0|0|tls").unwrap();
        assert_eq!(r.tls, Some(MirrorTls::default()));
        let r =
            mirror("127.0.0.1|4000|exit|0|0|forever|wait|tls|tls-certificates=/c|tls-hostname=h")
                .unwrap();
        assert!(r.wait);
        let t = r.tls.unwrap();
        assert_eq!(t.certificates.as_deref(), Some(std::path::Path::new("/c")));
        assert_eq!(t.hostname.as_deref(), Some("h"));
        for bad in [
            "127.0.0.1|4000|exit|0|0|tls-hostname=h",
            "127.0.0.1|4000|exit|0|0|tls|tls",
            "127.0.0.1|4000|exit|0|0|tls|tls-hostname=",
            "127.0.0.1|4000|exit|0|0|tls|tls-hostname=a|tls-hostname=b",
            "127.0.0.1|4000|exit|0|0|tls|wait",
        ] {
            assert_eq!(mirror(bad), Err(CommandError::BadMirrorTls), "{bad}");
        }
    }

    #[test]
    fn status_tls_keys() {
        let mut s = Fake::default().status();
        assert!(!format_status(&s).contains("tls"));
        s.tls = Some(crate::control::TlsStatus {
            mode: "require",
            verify_peer: true,
            clients: vec![
                (3, Some(("TLSv1.3".into(), Some("CN=sender one".into())))),
                (5, None),
            ],
        });
        let text = format_status(&s);
        assert!(
            text.ends_with(
                "tls=require tls_verify_peer=true tls_clients=1 client_3_tls=TLSv1.3 \
                 client_3_subject=CN=sender%20one client_5_tls=none"
            ),
            "{text}"
        );
        let json = status_text_to_json(&text).unwrap();
        assert_eq!(json["client_3_subject"], "CN=sender one");
        assert_eq!(json["tls_clients"], 1);
    }

    #[test]
    fn mirror_arguments() {
        let r = mirror("127.0.0.1|4000").unwrap();
        assert_eq!(r.dest, "127.0.0.1:4000".parse().unwrap());
        let parts = (r.action, r.bind, r.max_bps, r.retries);
        assert_eq!(parts, (MirrorAction::Exit, None, None, None));
        let r = mirror("[::1]|0|unlink|127.0.0.2|1000|5").unwrap();
        assert_eq!(r.dest, "[::1]:0".parse().unwrap());
        let parts = (r.action, r.bind, r.max_bps, r.retries);
        let bind = Some("127.0.0.2".parse().unwrap());
        assert_eq!(parts, (MirrorAction::Unlink, bind, Some(1000), Some(5)));
        let r = mirror("1.2.3.4|1|exit|0|0|forever|wait").unwrap();
        assert_eq!((r.retries, r.wait), (None, true));
        assert!(!mirror("1.2.3.4|1|exit|0|0|3").unwrap().wait);
        let r = mirror("0|1|nothing|0|0").unwrap();
        let parts = (r.action, r.bind, r.max_bps);
        assert_eq!(parts, (MirrorAction::Nothing, None, None));
        assert_eq!(mirror("::1|1|exit|::").unwrap().bind, None);

        use CommandError as E;
        #[rustfmt::skip]
        let cases = [
            ("", E::MirrorTooFewParameters),
            ("127.0.0.1", E::MirrorTooFewParameters),
            ("host|1", E::BadIp),
            ("host|x", E::BadIp),
            ("1.2.3.4|65536", E::BadPort),
            ("1.2.3.4|-1", E::BadPort),
            ("1.2.3.4|1|stop", E::BadAction),
            ("1.2.3.4|1|exit|nowhere", E::BadBind),
            ("1.2.3.4|1|exit|0|fast", E::MaxBpsUnparsable),
            ("1.2.3.4|1|exit|0|-5", E::MaxBpsUnparsable),
            ("1.2.3.4|1|exit|0|99999999999999999999", E::MaxBpsOutOfRange),
            ("1.2.3.4|1|exit|0|1|x", E::RetriesUnparsable),
            ("1.2.3.4|1|exit|0|1|4294967296", E::RetriesOutOfRange),
            ("1.2.3.4|1|exit|0|1|2|3", E::MirrorTooManyParameters),
            ("1.2.3.4|1|exit|0|1|2|wait|x", E::MirrorTooManyParameters),
        ];
        for (args, want) in cases {
            assert_eq!(mirror(args), Err(want), "{args:?}");
        }
    }

    proptest! {
        #[test]
        fn escaped_values_round_trip_without_spaces(text in "\\PC{0,40}|[ %\t\n\r]{0,5}") {
            let e = escape_value(&text);
            prop_assert!(!e.chars().any(|c| c.is_whitespace()));
            prop_assert_eq!(unescape_value(&e), text);
        }

        #[test]
        fn any_request_gets_one_line(v in proptest::collection::vec(".{0,40}", 0..10)) {
            let out = handle(&v, &Fake::default()).to_line();
            prop_assert!(out.ends_with('\n'));
            prop_assert_eq!(out.matches('\n').count(), 1);
            prop_assert!(Reply::parse_line(&out).is_ok());
        }

        #[test]
        fn known_commands_with_any_arguments(
            cmd in prop::sample::select(vec!["status", "acl", "mirror", "mirror_max_bps", "break"]),
            args in proptest::collection::vec("[0-9a-z.:/\\[\\] -]{0,20}", 0..8),
        ) {
            let v: Vec<String> = std::iter::once(cmd.to_string()).chain(args).collect();
            let out = handle(&v, &Fake::default()).to_line();
            prop_assert!(out.ends_with('\n'));
            prop_assert_eq!(out.matches('\n').count(), 1);
        }

        #[test]
        fn status_parse_never_panics(text in ".{0,80}") {
            if let Ok(p) = parse_status(&text) {
                let _ = status_json(&p);
            }
        }
    }
}
