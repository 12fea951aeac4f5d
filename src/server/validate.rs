//! Checks a request against the negotiated features and the export before any work.

use super::handshake::Negotiated;
use crate::proto::consts::*;
use crate::proto::{Command, NbdErrno, Request};

/// Largest READ or WRITE accepted (the C flexnbd's `read`/`write` send up to 1 GiB).
pub const MAX_REQUEST: u32 = 1 << 30;
/// Largest READ with the DF flag (sent as one chunk): the maximum payload
/// advertised.
pub const MAX_DF_READ: u32 = super::handshake::MAX_PAYLOAD;

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
    if !neg.structured {
        allowed &= !CMD_FLAG_DF;
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
    let len = req.length as u64;
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
    use proptest::prelude::*;

    const SIZE: u64 = 1 << 20;

    fn neg(structured: bool) -> Negotiated {
        let info = super::super::handshake::ExportInfo::local(1 << 20, false, false, 1);
        Negotiated {
            structured,
            base_allocation: structured,
            flags: super::super::handshake::transmission_flags(&info, structured),
        }
    }

    fn req(cmd: Command, flags: u16, offset: u64, length: u32) -> Request {
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

    proptest! {
        #[test]
        fn valid_ranges_are_inside(code in 0u16..10, flags: u16, offset: u64, length: u32, structured: bool, ro: bool) {
            let r = req(Command::from_code(code), flags, offset, length);
            if let Ok(op) = validate(&r, &neg(structured), SIZE, ro) {
                if !matches!(op, Op::Disc | Op::Flush) {
                    prop_assert!(offset + length as u64 <= SIZE);
                }
                let modifies = matches!(op, Op::Write { .. } | Op::Trim { .. } | Op::Zero { .. });
                prop_assert!(!(ro && modifies));
            }
        }
    }
}
