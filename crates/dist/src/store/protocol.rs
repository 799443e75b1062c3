//! The store's wire format: each message is a frame (u32 little-endian length, then that many
//! bytes) holding one request or one response. Waiting happens on the server, so a blocked
//! `get` or `wait` costs one request and one reply instead of a polling loop.

use std::io::{self, Read, Write};
use std::time::Duration;

use crate::wire::{DecodeError, Decoder, Encoder};

/// Largest frame either side accepts. Keys and values are small (addresses, counters, hashes);
/// tensors travel over Gloo, never through the store. The cap stops a corrupt length from
/// allocating gigabytes.
pub(crate) const MAX_FRAME_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Request {
    Set {
        key: String,
        value: Vec<u8>,
    },
    Get {
        key: String,
        timeout: Duration,
    },
    TryGet {
        key: String,
    },
    Wait {
        keys: Vec<String>,
        timeout: Duration,
    },
    Add {
        key: String,
        delta: i64,
    },
    CompareSet {
        key: String,
        expected: Option<Vec<u8>>,
        desired: Vec<u8>,
    },
    Delete {
        key: String,
    },
    NumKeys,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Response {
    Done,
    Value(Vec<u8>),
    Missing,
    TimedOut {
        missing: Vec<String>,
    },
    Counter(i64),
    Swapped,
    Mismatch {
        current: Option<Vec<u8>>,
    },
    Deleted(bool),
    Count(u64),
    /// The server understood the request but cannot carry it out (e.g. `add` on a value
    /// that is not a number); the text says why.
    Refused(String),
}

impl Request {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        match self {
            Request::Set { key, value } => e.u8(1).str(key).bytes(value),
            Request::Get { key, timeout } => e.u8(2).str(key).duration(*timeout),
            Request::TryGet { key } => e.u8(3).str(key),
            Request::Wait { keys, timeout } => e.u8(4).strings(keys).duration(*timeout),
            Request::Add { key, delta } => e.u8(5).str(key).i64(*delta),
            Request::CompareSet {
                key,
                expected,
                desired,
            } => e
                .u8(6)
                .str(key)
                .optional_bytes(expected.as_deref())
                .bytes(desired),
            Request::Delete { key } => e.u8(7).str(key),
            Request::NumKeys => e.u8(8),
        };
        e.finish()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        let request = match d.u8()? {
            1 => Request::Set {
                key: d.string()?,
                value: d.bytes()?.to_vec(),
            },
            2 => Request::Get {
                key: d.string()?,
                timeout: d.duration()?,
            },
            3 => Request::TryGet { key: d.string()? },
            4 => Request::Wait {
                keys: d.strings()?,
                timeout: d.duration()?,
            },
            5 => Request::Add {
                key: d.string()?,
                delta: d.i64()?,
            },
            6 => Request::CompareSet {
                key: d.string()?,
                expected: d.optional_bytes()?,
                desired: d.bytes()?.to_vec(),
            },
            7 => Request::Delete { key: d.string()? },
            8 => Request::NumKeys,
            op => return Err(DecodeError(format!("unknown request kind {op}"))),
        };
        d.finish()?;
        Ok(request)
    }
}

impl Response {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        match self {
            Response::Done => e.u8(1),
            Response::Value(value) => e.u8(2).bytes(value),
            Response::Missing => e.u8(3),
            Response::TimedOut { missing } => e.u8(4).strings(missing),
            Response::Counter(value) => e.u8(5).i64(*value),
            Response::Swapped => e.u8(6),
            Response::Mismatch { current } => e.u8(7).optional_bytes(current.as_deref()),
            Response::Deleted(deleted) => e.u8(8).u8(u8::from(*deleted)),
            Response::Count(count) => e.u8(9).u64(*count),
            Response::Refused(reason) => e.u8(10).str(reason),
        };
        e.finish()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        let response = match d.u8()? {
            1 => Response::Done,
            2 => Response::Value(d.bytes()?.to_vec()),
            3 => Response::Missing,
            4 => Response::TimedOut {
                missing: d.strings()?,
            },
            5 => Response::Counter(d.i64()?),
            6 => Response::Swapped,
            7 => Response::Mismatch {
                current: d.optional_bytes()?,
            },
            8 => Response::Deleted(d.u8()? != 0),
            9 => Response::Count(d.u64()?),
            10 => Response::Refused(d.string()?),
            kind => return Err(DecodeError(format!("unknown response kind {kind}"))),
        };
        d.finish()?;
        Ok(response)
    }
}

/// Writes one frame.
pub(crate) fn write_frame(writer: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    if payload.len() > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a store message of {} bytes exceeds the {} byte limit; keep large data out of the store",
                payload.len(),
                MAX_FRAME_BYTES
            ),
        ));
    }
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    writer.write_all(&frame)?;
    writer.flush()
}

/// Reads one frame; `None` when the peer closed the connection cleanly between frames.
pub(crate) fn read_frame(reader: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a store message claims {len} bytes, over the {MAX_FRAME_BYTES} byte limit"),
        ));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload)?;
    Ok(Some(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_round_trips() {
        let requests = [
            Request::Set {
                key: "k".into(),
                value: vec![1, 2],
            },
            Request::Get {
                key: "k".into(),
                timeout: Duration::from_millis(250),
            },
            Request::TryGet { key: "k".into() },
            Request::Wait {
                keys: vec!["a".into(), "b".into()],
                timeout: Duration::from_secs(3),
            },
            Request::Add {
                key: "n".into(),
                delta: -3,
            },
            Request::CompareSet {
                key: "k".into(),
                expected: None,
                desired: b"x".to_vec(),
            },
            Request::Delete { key: "k".into() },
            Request::NumKeys,
        ];
        for request in requests {
            assert_eq!(Request::decode(&request.encode()).unwrap(), request);
        }
    }

    #[test]
    fn every_response_round_trips() {
        let responses = [
            Response::Done,
            Response::Value(b"v".to_vec()),
            Response::Missing,
            Response::TimedOut {
                missing: vec!["a".into()],
            },
            Response::Counter(42),
            Response::Swapped,
            Response::Mismatch {
                current: Some(b"old".to_vec()),
            },
            Response::Deleted(true),
            Response::Count(9),
            Response::Refused("no".into()),
        ];
        for response in responses {
            assert_eq!(Response::decode(&response.encode()).unwrap(), response);
        }
    }

    #[test]
    fn frames_round_trip_and_oversized_lengths_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        let mut reader = &buf[..];
        assert_eq!(read_frame(&mut reader).unwrap().unwrap(), b"hello");
        assert!(read_frame(&mut reader).unwrap().is_none());

        let huge = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes();
        let err = read_frame(&mut &huge[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
