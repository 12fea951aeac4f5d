//! Checks a request against the negotiated features and the export before any work.

use super::handshake::Negotiated;
use crate::proto::consts::*;
use crate::proto::{Command, NbdErrno, Request};

/// Largest READ or WRITE accepted (the C flexnbd's `read`/`write` send up to 1 GiB).
pub const MAX_REQUEST: u64 = 1 << 30;
/// Largest READ with the DF flag (sent as one chunk): the maximum payload
/// advertised.
pub const MAX_DF_READ: u64 = super::handshake::MAX_PAYLOAD as u64;

/// Longest BLOCK_STATUS payload read (a length and context ids); a longer
/// one closes the connection.
pub const MAX_BLOCK_STATUS_PAYLOAD: u64 = 8 + 4 * 1024;

/// A BLOCK_STATUS with a payload (`PAYLOAD_LEN`, extended headers): the
/// payload holds the length of the range and the ids of the contexts
/// wanted. Gives the request as if it had asked for that range plainly;
/// refuses a malformed payload or an id other than `base:allocation`'s.
pub fn block_status_payload(req: &Request, payload: &[u8]) -> Result<Request, Refusal> {
    use super::handshake::BASE_ALLOCATION_ID;
    if payload.len() < 12 || !(payload.len() - 8).is_multiple_of(4) {
        return Err(refuse(NbdErrno::Inval, "malformed block status payload"));
    }
    let ids = payload[8..]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    for id in ids {
        if id != BASE_ALLOCATION_ID {
            return Err(refuse(NbdErrno::Inval, "unknown metadata context id"));
        }
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&payload[..8]);
    Ok(Request {
        flags: req.flags & !CMD_FLAG_PAYLOAD_LEN,
        length: u64::from_be_bytes(len),
        ..*req
    })
}

/// What a valid request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        df: bool,
    },
    Write {
        fua: bool,
    },
    Disc,
    Flush,
    Trim {
        fua: bool,
    },
    Zero {
        no_hole: bool,
        fast: bool,
        fua: bool,
    },
    Cache,
    BlockStatus {
        one: bool,
    },
}

/// A refused request: the error and a message for structured error chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub errno: NbdErrno,
    pub msg: &'static str,
}

fn refuse(errno: NbdErrno, msg: &'static str) -> Refusal {
    Refusal { errno, msg }
}

/// Validates a request for an export of `size` bytes.
pub fn validate(
    req: &Request,
    neg: &Negotiated,
    size: u64,
    read_only: bool,
) -> Result<Op, Refusal> {
    use NbdErrno::*;
    let mut allowed = req.command.allowed_flags();
    if !neg.structured() {
        allowed &= !CMD_FLAG_DF;
    }
    // A payload length: extended headers only, and on BLOCK_STATUS only
    // when advertised (it then arrives parsed: see `session`).
    if !neg.extended()
        || (req.command == Command::BlockStatus && neg.flags & FLAG_BLOCK_STATUS_PAYLOAD == 0)
    {
        allowed &= !CMD_FLAG_PAYLOAD_LEN;
    }
    if read_only {
        allowed &= !CMD_FLAG_FAST_ZERO;
    }
    if let Command::Unknown(_) = req.command {
        return Err(refuse(Inval, "unknown command"));
    }
    // Flags the export did not advertise are not allowed either.
    for (cmd_flag, export_flag) in [
        (CMD_FLAG_FUA, FLAG_SEND_FUA),
        (CMD_FLAG_FAST_ZERO, FLAG_SEND_FAST_ZERO),
        (CMD_FLAG_DF, FLAG_SEND_DF),
    ] {
        if neg.flags & export_flag == 0 {
            allowed &= !cmd_flag;
        }
    }
    if req.flags & !allowed != 0 {
        return Err(refuse(Inval, "unsupported flags for this command"));
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = req.length;
    let in_range = req.offset.checked_add(len).is_some_and(|e| e <= size);
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && read_only {
        return Err(refuse(Perm, "the export is read-only"));
    }
    let advertised = match req.command {
        Command::Flush => FLAG_SEND_FLUSH,
        Command::Trim => FLAG_SEND_TRIM,
        Command::WriteZeroes => FLAG_SEND_WRITE_ZEROES,
        Command::Cache => FLAG_SEND_CACHE,
        _ => 0,
    };
    if neg.flags & advertised != advertised {
        return Err(refuse(Inval, "command not advertised for this export"));
    }
    Ok(match req.command {
        Command::Read => {
            let df = req.flags & CMD_FLAG_DF != 0;
            if df && req.length > MAX_DF_READ {
                return Err(refuse(Overflow, "read too large to send unfragmented"));
            }
            if req.length > MAX_REQUEST {
                return Err(refuse(Inval, "read request too large"));
            }
            if !in_range {
                return Err(refuse(Inval, "read beyond the end of the export"));
            }
            Op::Read { df }
        }
        Command::Write => {
            if req.length > MAX_REQUEST {
                return Err(refuse(Inval, "write request too large"));
            }
            if !in_range {
                return Err(refuse(NoSpc, "write beyond the end of the export"));
            }
            Op::Write { fua }
        }
        Command::Disc => Op::Disc,
        Command::Flush => Op::Flush,
        Command::Trim => {
            if !in_range {
                return Err(refuse(Inval, "trim beyond the end of the export"));
            }
            Op::Trim { fua }
        }
        Command::WriteZeroes => {
            if !in_range {
                return Err(refuse(NoSpc, "write zeroes beyond the end of the export"));
            }
            Op::Zero {
                no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
                fast: req.flags & CMD_FLAG_FAST_ZERO != 0,
                fua,
            }
        }
        Command::Cache => {
            if !in_range {
                return Err(refuse(Inval, "cache beyond the end of the export"));
            }
            Op::Cache
        }
        Command::BlockStatus => {
            if !neg.base_allocation {
                return Err(refuse(Inval, "no metadata context was negotiated"));
            }
            if req.length == 0 {
                return Err(refuse(Inval, "block status of an empty range"));
            }
            if !in_range {
                return Err(refuse(Inval, "block status beyond the end of the export"));
            }
            Op::BlockStatus {
                one: req.flags & CMD_FLAG_REQ_ONE != 0,
            }
        }
        Command::Unknown(_) => return Err(refuse(Inval, "unknown command")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::reply::Framing;
    use proptest::prelude::*;

    const SIZE: u64 = 1 << 20;

    fn neg(structured: bool) -> Negotiated {
        neg_framed(match structured {
            true => Framing::Structured,
            false => Framing::Simple,
        })
    }

    fn neg_framed(framing: Framing) -> Negotiated {
        let info = super::super::handshake::ExportInfo::local(1 << 20, false, false, 1);
        Negotiated {
            framing,
            base_allocation: framing.structured(),
            flags: super::super::handshake::transmission_flags(&info, framing),
        }
    }

    fn req(cmd: Command, flags: u16, offset: u64, length: u64) -> Request {
        Request::new(cmd, flags, 1, offset, length)
    }

    fn errno(r: Result<Op, Refusal>) -> Option<NbdErrno> {
        r.err().map(|e| e.errno)
    }

    #[test]
    fn error_codes() {
        let n = neg(true);
        use NbdErrno::*;
        assert_eq!(
            errno(validate(&req(Command::Read, 0, SIZE, 1), &n, SIZE, false)),
            Some(Inval)
        );
        assert_eq!(
            errno(validate(
                &req(Command::Write, 0, SIZE - 1, 2),
                &n,
                SIZE,
                false
            )),
            Some(NoSpc)
        );
        assert_eq!(
            errno(validate(&req(Command::Write, 0, 0, 1), &n, SIZE, true)),
            Some(Perm)
        );
        assert_eq!(
            errno(validate(&req(Command::Trim, 0, 0, 1), &n, SIZE, true)),
            Some(Perm)
        );
        assert_eq!(
            errno(validate(
                &req(Command::WriteZeroes, 0, SIZE, 1),
                &n,
                SIZE,
                false
            )),
            Some(NoSpc)
        );
        assert_eq!(
            errno(validate(
                &req(Command::Unknown(42), 0, 0, 0),
                &n,
                SIZE,
                false
            )),
            Some(Inval)
        );
        assert_eq!(
            errno(validate(&req(Command::Read, 1 << 7, 0, 1), &n, SIZE, false)),
            Some(Inval)
        );
        assert_eq!(
            errno(validate(
                &req(Command::Write, CMD_FLAG_DF, 0, 1),
                &n,
                SIZE,
                false
            )),
            Some(Inval)
        );
        assert_eq!(
            errno(validate(
                &req(Command::Read, CMD_FLAG_DF, 0, 1),
                &neg(false),
                SIZE,
                false
            )),
            Some(Inval)
        );
        assert_eq!(
            errno(validate(
                &req(Command::BlockStatus, 0, 0, 1),
                &neg(false),
                SIZE,
                false
            )),
            Some(Inval)
        );
        // DF is honoured up to the maximum payload, refused above it.
        let big = 1u64 << 30;
        assert_eq!(
            errno(validate(
                &req(Command::Read, CMD_FLAG_DF, 0, MAX_DF_READ),
                &n,
                big,
                false
            )),
            None
        );
        assert_eq!(
            errno(validate(
                &req(Command::Read, CMD_FLAG_DF, 0, MAX_DF_READ + 1),
                &n,
                big,
                false
            )),
            Some(Overflow)
        );
        assert_eq!(
            errno(validate(
                &req(Command::Read, 0, u64::MAX, 10),
                &n,
                SIZE,
                false
            )),
            Some(Inval)
        );
        assert_eq!(
            validate(
                &req(Command::Read, CMD_FLAG_FUA | CMD_FLAG_DF, 0, 512),
                &n,
                SIZE,
                false
            ),
            Ok(Op::Read { df: true })
        );
        assert_eq!(
            validate(&req(Command::Read, 0, SIZE, 0), &n, SIZE, false),
            Ok(Op::Read { df: false })
        );
    }

    #[test]
    fn payload_lengths_need_extended_headers() {
        use NbdErrno::*;
        let bs = |flags, len| req(Command::BlockStatus, flags, 0, len);
        let ext = neg_framed(Framing::Extended);
        assert_ne!(ext.flags & FLAG_BLOCK_STATUS_PAYLOAD, 0);
        assert_eq!(neg(true).flags & FLAG_BLOCK_STATUS_PAYLOAD, 0);
        // The flag is refused on compact headers and on other commands.
        let flagged = bs(CMD_FLAG_PAYLOAD_LEN, 4096);
        assert_eq!(
            errno(validate(&flagged, &neg(true), SIZE, false)),
            Some(Inval)
        );
        let trim = req(Command::Trim, CMD_FLAG_PAYLOAD_LEN, 0, 4096);
        assert_eq!(errno(validate(&trim, &ext, SIZE, false)), Some(Inval));
        // A WRITE may carry it; its length is the payload's either way.
        let w = req(Command::Write, CMD_FLAG_PAYLOAD_LEN, 0, 4096);
        assert_eq!(
            validate(&w, &ext, SIZE, false),
            Ok(Op::Write { fua: false })
        );
        assert_eq!((w.payload_len(true), w.payload_len(false)), (4096, 4096));
        assert_eq!(
            (flagged.payload_len(true), flagged.payload_len(false)),
            (4096, 0)
        );
        // The payload: a 64-bit length, then context ids.
        let mut p = (SIZE / 2).to_be_bytes().to_vec();
        p.extend_from_slice(&super::super::handshake::BASE_ALLOCATION_ID.to_be_bytes());
        let r = block_status_payload(&bs(CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_REQ_ONE, 12), &p).unwrap();
        assert_eq!((r.length, r.flags), (SIZE / 2, CMD_FLAG_REQ_ONE));
        assert_eq!(
            validate(&r, &ext, SIZE, false),
            Ok(Op::BlockStatus { one: true })
        );
        let bad = |p: &[u8]| {
            block_status_payload(&bs(CMD_FLAG_PAYLOAD_LEN, 0), p)
                .err()
                .map(|e| e.errno)
        };
        assert_eq!(bad(&p[..8]), Some(Inval), "no context id");
        assert_eq!(bad(&p[..11]), Some(Inval), "a partial id");
        let mut other = p.clone();
        other.extend_from_slice(&7u32.to_be_bytes());
        assert_eq!(bad(&other), Some(Inval), "an id never agreed");
        // 64-bit lengths: a whole multi-terabyte range in one request.
        let huge = 1u64 << 42;
        let z = req(Command::WriteZeroes, 0, 0, huge);
        assert!(validate(&z, &ext, huge, false).is_ok());
        assert_eq!(errno(validate(&z, &ext, huge - 1, false)), Some(NoSpc));
        let rd = req(Command::Read, 0, 0, MAX_REQUEST + 1);
        assert_eq!(errno(validate(&rd, &ext, huge, false)), Some(Inval));
    }

    proptest! {
        #[test]
        fn valid_ranges_are_inside(code in 0u16..10, flags: u16, offset: u64, length: u64, framing in 0u8..3, ro: bool) {
            let framing = [Framing::Simple, Framing::Structured, Framing::Extended][framing as usize];
            let r = req(Command::from_code(code), flags, offset, length);
            if let Ok(op) = validate(&r, &neg_framed(framing), SIZE, ro) {
                if !matches!(op, Op::Disc | Op::Flush) {
                    prop_assert!(offset.checked_add(length).is_some_and(|e| e <= SIZE));
                }
                let modifies = matches!(op, Op::Write { .. } | Op::Trim { .. } | Op::Zero { .. });
                prop_assert!(!(ro && modifies));
            }
        }
    }
}
